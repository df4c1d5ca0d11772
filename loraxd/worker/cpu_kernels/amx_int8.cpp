// y = x @ W.T (+ bias) for an int8 weight-only W (w = scale[n] * q[n][k]) on Intel AMX
// tiles (AMX-INT8), in exact integer arithmetic.
//
// The int8 tile products take int8 inputs on both sides, so x is written as integers:
// each row is scaled by a power of two (exact) to X = x * 2^e with |X| < 2^23 (its
// largest value keeps all 24 bits of an fp32), rounded to an integer, and split into
// three bytes, X = hi * 2^16 + mid * 2^8 + lo (hi signed, mid and lo unsigned). Three
// tile products (TDPBSSD, TDPBUSD twice) sum q against each byte in int32, exactly, and
// the epilogue gives y = (hi_sum * 2^16 + mid_sum * 2^8 + lo_sum) * 2^-e * scale[n] + bias.
// What is lost is each x below 2^-24 of its row's largest (the rounding to an integer),
// far under the weight's own quantization. Integer sums do not depend on order, so a
// row's numbers do not depend on its batch.
//
// q is held in AMX's layout, tile after tile: tiles[t][kq][r][n][j] = q[16t + n][64kq +
// 4r + j] (16 columns x 64 K values, 1 KB), read straight from memory: a quarter of
// fp32's bytes, and no conversion, so the call is bound by the read. A call walks one
// column tile at a time (threads split them) over passes of up to 16 rows. K must be a
// multiple of 64 and N of 16 (quantized.py falls back otherwise).
#include "amx.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using namespace loraxd_amx;

constexpr int64_t kTileK = 64;                   // K values per tile row (int8)
constexpr int64_t kTileBytes = kTileK * kTileN;  // bytes per B tile
constexpr int64_t kAheadTiles = 4;  // how far ahead in its stream a B tile is prefetched
constexpr int kMantissaBits = 23;   // |X| < 2^23

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Each row of x [M, K] as bytes [3][K/64][M][64] (hi, mid, lo; each plane in tile rows, so
// that an A tile of 16 rows is 1 KB in a row, not 16 lines a row of x apart) and the row's
// 2^-e in `unscale`
// (NaN for a row holding NaN or inf, so that its outputs are NaN as an fp32 matmul's).
template <typename T>
void split_rows(const T* x, int64_t M, int64_t K, uint8_t* bytes, float* unscale) {
  const int64_t plane = M * K;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T* row = x + m * K;
      __m512 amax = _mm512_setzero_ps(), poison = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = load16(row + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN if any is
      }
      const float top = _mm512_reduce_max_ps(amax);
      const bool finite = !std::isnan(_mm512_reduce_add_ps(poison));
      int exp = 0;
      std::frexp(finite ? top : 0.f, &exp);  // top < 2^exp
      const int e = kMantissaBits - exp;  // X = x * 2^e, as two exact powers of two
      unscale[m] = finite ? std::ldexp(1.f, -e) : NAN;
      const __m512 p1 = _mm512_set1_ps(std::ldexp(1.f, e / 2));
      const __m512 p2 = _mm512_set1_ps(finite ? std::ldexp(1.f, e - e / 2) : 0.f);
      const __m512 limit = _mm512_set1_ps(float((1 << kMantissaBits) - 1));
      uint8_t *hi = bytes + m * kTileK, *mid = hi + plane, *lo = mid + plane;
      for (int64_t k = 0; k < K; k += 16) {
        const int64_t at = k / kTileK * M * kTileK + k % kTileK;  // tile row k / 64 of row m
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(row + k), p1), p2);
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
        const __m512i X = _mm512_cvtps_epi32(v);  // to nearest even
        auto put = [&](uint8_t* plane_at, __m512i v) {  // the low byte of each lane
          _mm_storeu_si128(reinterpret_cast<__m128i*>(plane_at), _mm512_cvtepi32_epi8(v));
        };
        put(hi + at, _mm512_srai_epi32(X, 16));
        put(mid + at, _mm512_srai_epi32(X, 8));
        put(lo + at, X);
      }
    }
  });
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")

// Tiles: C hi 0, mid 1, lo 2 (int32); A hi 3, mid 4, lo 5; B 6 and 7 (alternate K steps).
void configure(TileConfig& cfg, int64_t rows) {
  cfg = TileConfig{};
  for (int t = 0; t < 6; ++t) cfg.set(t, rows);
  cfg.set(6, kTileRows), cfg.set(7, kTileRows);
  _tile_loadconfig(&cfg);
}

inline void prefetch_tile(const int8_t* tile) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int64_t line = 0; line < kTileBytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

// One K step: the B tile at b into tile 6 or 7 (alternate steps, so that a step's load
// need not wait for the last step's products), the three byte tiles of x, three products.
template <int B>
inline void k_step(const int8_t* b, const uint8_t* hi, const uint8_t* mid, const uint8_t* lo) {
  if constexpr (B == 6) _tile_loadd(6, b, kRowBytes); else _tile_loadd(7, b, kRowBytes);
  _tile_loadd(3, hi, kRowBytes);
  _tile_loadd(4, mid, kRowBytes);
  _tile_loadd(5, lo, kRowBytes);
  if constexpr (B == 6) {
    _tile_dpbssd(0, 3, 6);
    _tile_dpbusd(1, 4, 6);
    _tile_dpbusd(2, 5, 6);
  } else {
    _tile_dpbssd(0, 3, 7);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 7);
  }
}

// One pass: up to 16 rows of the three byte planes (a, plane apart; K steps `step` apart)
// against one column tile's KQ tiles at b; the three int32 sums to c [3][16][16].
void pass(const uint8_t* a, int64_t step, int64_t plane, const int8_t* b, int64_t KQ,
          int32_t* c) {
  const uint8_t *mid = a + plane, *lo = a + 2 * plane;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  int64_t kq = 0;
  for (; kq + 1 < KQ; kq += 2) {
    prefetch_tile(b + (kq + kAheadTiles) * kTileBytes);
    prefetch_tile(b + (kq + 1 + kAheadTiles) * kTileBytes);
    const int64_t at = kq * step, next = at + step;
    k_step<6>(b + kq * kTileBytes, a + at, mid + at, lo + at);
    k_step<7>(b + (kq + 1) * kTileBytes, a + next, mid + next, lo + next);
  }
  if (kq < KQ) {
    const int64_t at = kq * step;
    k_step<6>(b + kq * kTileBytes, a + at, mid + at, lo + at);
  }
  constexpr int64_t cstride = kTileN * sizeof(int32_t);
  _tile_stored(0, c, cstride);
  _tile_stored(1, c + kTileRows * kTileN, cstride);
  _tile_stored(2, c + 2 * kTileRows * kTileN, cstride);
}

template <typename T>
void run(const uint8_t* bytes, const float* unscale, int64_t M, int64_t K, const int8_t* tiles,
         int64_t NT, const float* scale, const float* bias, T* y) {
  const int64_t KQ = K / kTileK, N = NT * kTileN, plane = M * K;
  at::parallel_for(0, NT, 1, [&](int64_t first, int64_t last) {
    TileConfig cfg;
    int64_t configured = -1;
    alignas(64) int32_t c[3 * kTileRows * kTileN];
    for (int64_t t = first; t < last; ++t) {
      const int64_t col = t * kTileN;
      const v16 s = load(scale + col), b = load(bias + col);
      for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m0);
        if (rows != configured) configure(cfg, configured = rows);
        pass(bytes + m0 * kTileK, M * kTileK, plane, tiles + t * KQ * kTileBytes, KQ, c);
        for (int64_t m = 0; m < rows; ++m) {
          const int32_t* r = c + m * kTileN;
          v16 sum;  // the three sums as one integer (exact in a double), rounded once
          for (int j = 0; j < kTileN; ++j) {
            sum[j] = float(double(r[j]) * 65536.0 + double(r[kTileRows * kTileN + j]) * 256.0 +
                           double(r[2 * kTileRows * kTileN + j]));
          }
          v16 v = sum * unscale[m0 + m] * s;
          asm("" : "+v"(v));  // rounded before the bias
          store(y + (m0 + m) * N + col, v + b);
        }
      }
    }
    _tile_release();
  });
}

#pragma GCC pop_options

at::Tensor amx_mm_int8(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales,
                       const at::Tensor& bias) {
  TORCH_CHECK(usable(true), "amx_mm_int8: this CPU or kernel gives no AMX-INT8");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (dtype == at::kFloat || dtype == at::kBFloat16),
              "amx_mm_int8: x must be a contiguous 2-D float32 or bfloat16 tensor");
  TORCH_CHECK(tiles.dim() == 5 && tiles.is_contiguous() && tiles.size(2) == kTileRows &&
              tiles.size(3) == kTileN && tiles.size(4) == 4 && tiles.scalar_type() == at::kChar,
              "amx_mm_int8: tiles must be contiguous int8 [N/16, K/64, 16, 16, 4]");
  const int64_t M = x.size(0), K = x.size(1), NT = tiles.size(0), N = NT * kTileN;
  TORCH_CHECK(K == tiles.size(1) * kTileK, "amx_mm_int8: x has ", K, " columns, the tiles ",
              tiles.size(1) * kTileK);
  for (const at::Tensor* v : {&scales, &bias}) {
    TORCH_CHECK(v->dim() == 1 && v->scalar_type() == at::kFloat && v->is_contiguous() &&
                v->size(0) == N, "amx_mm_int8: scales and bias must be float32 [N]");
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // x's bytes and row scales: the calling thread's scratch (no allocation per call)
  static thread_local std::vector<uint8_t> bytes;
  static thread_local std::vector<float> unscale;
  bytes.resize(3 * M * K);
  unscale.resize(M);
  uint8_t* bp = bytes.data();
  float* up = unscale.data();
  const auto* tp = tiles.data_ptr<int8_t>();
  const float *sp = scales.data_ptr<float>(), *biasp = bias.data_ptr<float>();
  if (dtype == at::kFloat) {
    split_rows(x.data_ptr<float>(), M, K, bp, up);
    run(bp, up, M, K, tp, NT, sp, biasp, y.data_ptr<float>());
  } else {
    split_rows(x.data_ptr<c10::BFloat16>(), M, K, bp, up);
    run(bp, up, M, K, tp, NT, sp, biasp, y.data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("amx_mm_int8(Tensor x, Tensor tiles, Tensor scales, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("amx_mm_int8", &amx_mm_int8);
}
