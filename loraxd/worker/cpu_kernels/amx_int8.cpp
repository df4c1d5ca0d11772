// y = x @ W.T (+ bias) for an int8 weight-only W (w = scale[n] * q[n][k]) on Intel AMX
// tiles (AMX-INT8), in exact integer arithmetic.
//
// The int8 tile products take 8-bit integers on both sides, so x is written as integers:
// each row is scaled by a power of two (exact) to X = x * 2^e with |X| < 2^23 (its
// largest value keeps all 24 bits of an fp32), rounded to an integer, offset to
// X + 2^23 in [0, 2^24) and split into three unsigned bytes, hi * 2^16 + mid * 2^8 + lo.
// The three byte rows of each row of x are rows of one A operand (a pass of up to 10 rows
// of x is up to 30 rows: two A tiles), so one unsigned-by-signed tile product (TDPBUSD)
// per A tile and column tile sums q against all three bytes in int32, exactly; the
// epilogue gives y = (hi_sum * 2^16 + mid_sum * 2^8 + lo_sum - 2^23 * colsum[n]) * 2^-e *
// scale[n] + bias, colsum[n] = sum_k q[n][k] (made at packing). What is lost is each x
// below 2^-24 of its row's largest (the rounding to an integer), far under the weight's
// own quantization. Integer sums do not depend on order, so a row's numbers do not
// depend on its batch.
//
// q is held in AMX's layout, tile after tile: tiles[t][kq][r][n][j] = q[16t + n][64kq +
// 4r + j] (16 columns x 64 K values, 1 KB), read straight from memory: a quarter of
// fp32's bytes, and no conversion. A product costs ~17 ns here whatever its rows, so a
// decode call is bound by its products and tile loads as much as by the read (hence the
// one product per A tile: three had made it several times the read). A call walks two
// column tiles at a time (threads split the pairs: two streams, four independent sums)
// over passes of up to 10 rows. K must be a multiple of 64 and N of 16 (quantized.py
// falls back otherwise).
#include "amx.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using namespace loraxd_amx;

constexpr int64_t kTileK = 64;                   // K values per tile row (int8)
constexpr int64_t kPassRows = 10;   // rows of x per pass: their 3 byte rows fill two A tiles
constexpr int kMantissaBits = 23;   // |X| < 2^23

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The byte row of (row m, byte b: 0 hi, 1 mid, 2 lo) within a K step's 3M rows: the rows
// of each pass together, hi rows first, then mid, then lo.
inline int64_t byte_row(int64_t m, int b, int64_t M) {
  const int64_t m0 = m / kPassRows * kPassRows, rows = std::min(kPassRows, M - m0);
  return 3 * m0 + b * rows + (m - m0);
}

// Each row of x [M, K] as bytes [K/64][3M][64] (so that a pass's A tiles are its rows'
// bytes, 64 K values a tile row, one K step after the other) and the row's 2^-e in
// `unscale` (NaN for a row holding NaN or inf, so that its outputs are NaN as an fp32
// matmul's).
template <typename T>
void split_rows(const T* x, int64_t M, int64_t K, uint8_t* bytes, float* unscale) {
  const int64_t step = 3 * M * kTileK;
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
      uint8_t* hi = bytes + byte_row(m, 0, M) * kTileK;
      uint8_t* mid = bytes + byte_row(m, 1, M) * kTileK;
      uint8_t* lo = bytes + byte_row(m, 2, M) * kTileK;
      for (int64_t k = 0; k < K; k += 16) {
        const int64_t at = k / kTileK * step + k % kTileK;
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(load16(row + k), p1), p2);
        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit);
        // to nearest even, then + 2^23 (exact in int32)
        const __m512i X = _mm512_add_epi32(_mm512_cvtps_epi32(v),
                                           _mm512_set1_epi32(1 << kMantissaBits));
        auto put = [&](uint8_t* plane_at, __m512i v) {  // the low byte of each lane
          _mm_storeu_si128(reinterpret_cast<__m128i*>(plane_at), _mm512_cvtepi32_epi8(v));
        };
        put(hi + at, _mm512_srli_epi32(X, 16));
        put(mid + at, _mm512_srli_epi32(X, 8));
        put(lo + at, X);
      }
    }
  });
}

inline __m512i wide8(const int32_t* p, int shift) {  // 8 int32 lanes as int64, << shift
  return _mm512_slli_epi64(
      _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), shift);
}

// 8 columns' offset in the sums: 2^23 * colsum, in int64 (made once per column tile)
inline __m512i offset8(const int32_t* colsum) { return wide8(colsum, kMantissaBits); }

// 8 lanes of hi * 2^16 + mid * 2^8 + lo - offset, exactly, in int64
inline __m512i exact8(const int32_t* hi, const int32_t* mid, const int32_t* lo, __m512i off) {
  const __m512i s = _mm512_add_epi64(_mm512_add_epi64(wide8(hi, 16), wide8(mid, 8)),
                                     wide8(lo, 0));
  return _mm512_sub_epi64(s, off);
}

// 16 columns' sums of the three bytes less the offset's, as one integer rounded once to
// fp32 (to nearest even)
inline v16 exact_sum(const int32_t* hi, const int32_t* mid, const int32_t* lo, __m512i off0,
                     __m512i off1) {
  const __m256 a = _mm512_cvtepi64_ps(exact8(hi, mid, lo, off0));
  const __m256 b = _mm512_cvtepi64_ps(exact8(hi + 8, mid + 8, lo + 8, off1));
  return reinterpret_cast<v16>(_mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8")

LORAXD_AMX_PRODUCT(Int8Product, _tile_dpbusd);  // x's unsigned bytes by q's signed ones

template <typename T>
void run(const uint8_t* bytes, const float* unscale, int64_t M, int64_t K, const int8_t* tiles,
         int64_t NT, const float* scale, const int32_t* colsum, const float* bias, T* y) {
  const int64_t KQ = K / kTileK, N = NT * kTileN, step = 3 * M * kTileK;
  at::parallel_for(0, (NT + 1) / 2, 1, [&](int64_t first, int64_t last) {
    TileConfig cfg;
    int64_t configured = -1;
    alignas(64) int32_t c[2 * kTileRows * 2 * kTileN];
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = 2 * blk;
      const int nt = NT - t0 >= 2 ? 2 : 1;
      for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
        const int64_t rows = std::min(kPassRows, M - m0), byte_rows = 3 * rows;
        if (byte_rows != configured) configure(cfg, configured = byte_rows);
        block_pass<Int8Product>(reinterpret_cast<const char*>(bytes + 3 * m0 * kTileK),
                                byte_rows, kRowBytes, step, tiles, t0, nt, KQ, c);
        for (int j0 = 0; j0 < nt * kTileN; j0 += kTileN) {
          const int64_t col = t0 * kTileN + j0;
          const __m512i off0 = offset8(colsum + col), off1 = offset8(colsum + col + 8);
          const v16 s = load(scale + col), b = load(bias + col);
          for (int64_t m = 0; m < rows; ++m) {
            // byte row r of the pass is row r % 16 of C tile r / 16 (c: [32][32])
            const int32_t* hi = c + m * 2 * kTileN + j0;
            const int32_t* mid = c + (rows + m) * 2 * kTileN + j0;
            const int32_t* lo = c + (2 * rows + m) * 2 * kTileN + j0;
            v16 v = exact_sum(hi, mid, lo, off0, off1) * unscale[m0 + m] * s;
            asm("" : "+v"(v));  // rounded before the bias
            store(y + (m0 + m) * N + col, v + b);
          }
        }
      }
    }
    _tile_release();
  });
}

#pragma GCC pop_options

at::Tensor amx_mm_int8(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales,
                       const at::Tensor& colsums, const at::Tensor& bias) {
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
  TORCH_CHECK(colsums.dim() == 1 && colsums.scalar_type() == at::kInt &&
              colsums.is_contiguous() && colsums.size(0) == N,
              "amx_mm_int8: colsums must be int32 [N] (each column's sum of q)");
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
  const int32_t* cp = colsums.data_ptr<int32_t>();
  if (dtype == at::kFloat) {
    split_rows(x.data_ptr<float>(), M, K, bp, up);
    run(bp, up, M, K, tp, NT, sp, cp, biasp, y.data_ptr<float>());
  } else {
    split_rows(x.data_ptr<c10::BFloat16>(), M, K, bp, up);
    run(bp, up, M, K, tp, NT, sp, cp, biasp, y.data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("amx_mm_int8(Tensor x, Tensor tiles, Tensor scales, Tensor colsums, Tensor bias) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("amx_mm_int8", &amx_mm_int8);
}
