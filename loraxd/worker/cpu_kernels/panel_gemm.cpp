// y = x @ W.T (+ bias) in fp32 for a CPU, with W stored as panels of 32 output columns:
// panels[p][k][j] = W[32p + j][k] (zero rows past N). One panel is read front to back as a
// stream while a tile of up to 8 rows of x accumulates in 16 vector registers, so the
// weight, the step's biggest read, is pulled from memory once per call at close to the
// machine's read bandwidth (oneDNN's and MKL's skinny fp32 GEMMs reach about half of it
// on the weights of a decode step). Every output is a plain k-ordered sum, so a row's
// result does not depend on how many rows share the call.
//
// The same tile runs int8 panels (int8 weight-only quantization): each row of 32 int8
// weights is widened to fp32 in registers, the sums are fp32, and the per-column scales
// multiply the sums once at the end (w = scale[n] * q[n][k]): a quarter of fp32's bytes.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>


namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kCols = 32;      // a panel's width: two vectors
constexpr int64_t kRowTile = 8;    // rows of x per pass over a panel: 16 accumulators
constexpr int64_t kAheadBytes = 4096;  // prefetch distance in the panel's stream
// K steps per block when rows > kRowTile: 64 beat 128 and 256 (a step's 121 linears, cold,
// best of 36: 16 rows 30 ms against 42 in one pass, 32 rows 48 against 62, 64 rows 82
// against 110, 128 rows 163 against 200; 8 rows, one pass either way, ~30)
constexpr int64_t kBlockK = 64;
constexpr int64_t kChunkRows = 64;  // rows of x whose tiles share a pass over each block
constexpr int64_t kPairBlockK = 16;  // K steps of one panel before its pair's turn (2 KB fp32)

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }

// a panel row's 32 weights as two fp32 vectors
inline void load_row(const float* row, v16& w0, v16& w1) {
  w0 = load(row);
  w1 = load(row + 16);
}
inline v16 widen(const int8_t* p) {  // sign-extend then convert: GCC's generic vector
  // conversion from int8 lanes to float lanes comes out as 16 scalar conversions
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<v16>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
}
inline void load_row(const int8_t* row, v16& w0, v16& w1) {
  w0 = widen(row);
  w1 = widen(row + 16);
}

// Rows of x (at most kRowTile) against K-range [k0, k0 + kn) of one panel. `acc` holds the
// partial sums between K blocks ([Rows][32]): `first` starts them at zero, `last` writes
// y instead. Storing and reloading fp32 partial sums is exact, so each output is the same
// k-ordered chain of FMAs however the call is blocked. Each step prefetches `pf_lines`
// lines at pf + k * pf_stride (null: none).
template <typename W, int Rows>
void tile(const float* __restrict x, int64_t ldx, int64_t kn, const W* __restrict panel,
          float* __restrict acc, bool first, bool last, const float* __restrict scale,
          const float* __restrict bias, float* __restrict y, int64_t ldy, int64_t cols,
          const char* pf, int64_t pf_stride, int pf_lines) {
  v16 lo[Rows], hi[Rows];
  for (int m = 0; m < Rows; ++m) {
    lo[m] = first ? v16{} : load(acc + m * kCols);
    hi[m] = first ? v16{} : load(acc + m * kCols + 16);
  }
  for (int64_t k = 0; k < kn; ++k) {
    const W* row = panel + k * kCols;
    if (pf_lines > 0) {
      const char* ahead = pf + k * pf_stride;
      __builtin_prefetch(ahead, 0, 3);
      if (pf_lines > 1) __builtin_prefetch(ahead + 64, 0, 3);
    }
    v16 w0, w1;
    load_row(row, w0, w1);
    for (int m = 0; m < Rows; ++m) {
      const float xv = x[m * ldx + k];
      lo[m] += xv * w0;
      hi[m] += xv * w1;
    }
  }
  if (!last) {
    for (int m = 0; m < Rows; ++m) {
      std::memcpy(acc + m * kCols, &lo[m], sizeof lo[m]);
      std::memcpy(acc + m * kCols + 16, &hi[m], sizeof hi[m]);
    }
    return;
  }
  const v16 b0 = load(bias), b1 = load(bias + 16);
  v16 s0 = v16{} + 1.0f, s1 = s0;
  if (scale != nullptr) { s0 = load(scale); s1 = load(scale + 16); }
  for (int m = 0; m < Rows; ++m) {
    float out[kCols];
    v16 a = lo[m] * s0, b = hi[m] * s1;
    // rounded before the bias, in every tile size alike: a fused multiply-add here would
    // make a row's numbers depend on which tile (how many rows) it was computed in
    asm("" : "+v"(a), "+v"(b));
    a += b0;
    b += b1;
    std::memcpy(out, &a, sizeof a);
    std::memcpy(out + 16, &b, sizeof b);
    std::memcpy(y + m * ldy, out, cols * sizeof(float));
  }
}

template <typename W>
using TileFn = void (*)(const float*, int64_t, int64_t, const W*, float*, bool, bool,
                        const float*, const float*, float*, int64_t, int64_t, const char*,
                        int64_t, int);
template <typename W>
constexpr TileFn<W> kTiles[kRowTile + 1] = {nullptr, tile<W, 1>, tile<W, 2>, tile<W, 3>,
                                            tile<W, 4>, tile<W, 5>, tile<W, 6>, tile<W, 7>,
                                            tile<W, 8>};

// One panel against every row. Up to kRowTile rows: one pass, prefetching kAheadBytes
// ahead in the stream (a memory-bound read). More rows: the panel's first row tile alone
// would wait on memory while the others run from cache, so the panel is walked in K
// blocks, every row tile of a chunk of kChunkRows rows over each block in turn, and each
// tile prefetches its share of the next block: the read of the weight overlaps the
// arithmetic of all the rows.
template <typename W>
void panel_rows(const float* x, int64_t M, int64_t K, const W* panel, const float* scale,
                const float* bias, float* y, int64_t n, int64_t cols) {
  constexpr int64_t row_bytes = kCols * sizeof(W);
  if (M <= kRowTile) {
    kTiles<W>[M](x, K, K, panel, nullptr, true, true, scale, bias, y, n, cols,
                 reinterpret_cast<const char*>(panel) + kAheadBytes, row_bytes,
                 row_bytes > 64 ? 2 : 1);
    return;
  }
  alignas(64) float acc[kChunkRows * kCols];
  for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
    const int64_t mc = std::min(kChunkRows, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kn = std::min(kBlockK, K - k0);
      // the next block: this panel's, or past its end the next panel's first one
      const char* next = reinterpret_cast<const char*>(panel + (k0 + kn) * kCols);
      const int64_t next_bytes = kBlockK * row_bytes;
      for (int64_t m = 0, t = 0; m < mc; m += kRowTile, ++t) {
        const int64_t rows = std::min(kRowTile, mc - m);
        const int64_t share = t * kn * 64;  // one line per step of this tile
        kTiles<W>[rows](x + (m0 + m) * K + k0, K, kn, panel + k0 * kCols, acc + m * kCols,
                        k0 == 0, k0 + kn == K, scale, bias, y + (m0 + m) * n, n, cols,
                        next + share, 64, share < next_bytes ? 1 : 0);
      }
    }
  }
}

// Up to kRowTile rows against panels [first, last): the two halves of the range in step, a
// block of kPairBlockK rows of one half's panel then of the other's, so that a core keeps
// two streams in flight (it overlaps more misses than one stream lets it: one step's 121
// fp32 linears, cold, interleaved A/B, median of 31: 1 row 32.0 -> 28.6 ms, 8 rows 35.6 ->
// 34.5 ms). The partial sums wait in `acc` between blocks, exactly as in panel_rows.
template <typename W>
void panel_pairs(const float* x, int64_t M, int64_t K, const W* panels, const float* scale,
                 const float* bias, float* y, int64_t n, int64_t first, int64_t last) {
  constexpr int64_t row_bytes = kCols * sizeof(W);
  alignas(64) float acc[2][kRowTile * kCols];
  const int64_t half = (last - first) / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t pair[2] = {first + i, first + half + i};
    for (int64_t k0 = 0; k0 < K; k0 += kPairBlockK) {
      const int64_t kn = std::min(kPairBlockK, K - k0);
      for (int s = 0; s < 2; ++s) {
        const int64_t p = pair[s];
        const W* block = panels + (p * K + k0) * kCols;
        kTiles<W>[M](x + k0, K, kn, block, acc[s], k0 == 0, k0 + kn == K,
                     scale ? scale + p * kCols : nullptr, bias + p * kCols, y + p * kCols, n,
                     std::min(kCols, n - p * kCols),
                     reinterpret_cast<const char*>(block) + kAheadBytes, row_bytes,
                     row_bytes > 64 ? 2 : 1);
      }
    }
  }
  for (int64_t p = first + 2 * half; p < last; ++p)  // an odd one out
    panel_rows<W>(x, M, K, panels + p * K * kCols, scale ? scale + p * kCols : nullptr,
                  bias + p * kCols, y + p * kCols, n, std::min(kCols, n - p * kCols));
}

template <typename W>
at::Tensor run(const at::Tensor& x, const at::Tensor& panels, const float* scale,
               const at::Tensor& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "panel_mm: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(2) == kCols,
              "panel_mm: panels must be contiguous [P, K, 32]");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "panel_mm: x has ", K, " columns, the panels ",
              panels.size(1), " rows");
  TORCH_CHECK(n > (P - 1) * kCols && n <= P * kCols, "panel_mm: ", n,
              " outputs do not fit ", P, " panels");
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
              bias.size(0) == P * kCols, "panel_mm: bias must be float32 [P * 32]");
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const W* pp = static_cast<const W*>(panels.data_ptr());
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    if (M <= kRowTile) {
      panel_pairs<W>(xp, M, K, pp, scale, bp, yp, n, first, last);
      return;
    }
    for (int64_t p = first; p < last; ++p) {
      panel_rows<W>(xp, M, K, pp + p * K * kCols, scale ? scale + p * kCols : nullptr,
                    bp + p * kCols, yp + p * kCols, n, std::min(kCols, n - p * kCols));
    }
  });
  return y;
}

at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias,
                    int64_t n) {
  TORCH_CHECK(panels.scalar_type() == at::kFloat, "panel_mm: panels must be float32");
  return run<float>(x, panels, nullptr, bias, n);
}

at::Tensor panel_mm_int8(const at::Tensor& x, const at::Tensor& panels,
                         const at::Tensor& scales, const at::Tensor& bias, int64_t n) {
  TORCH_CHECK(panels.scalar_type() == at::kChar, "panel_mm_int8: panels must be int8");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous() && scales.size(0) == panels.size(0) * kCols,
              "panel_mm_int8: scales must be float32 [P * 32]");
  return run<int8_t>(x, panels, scales.data_ptr<float>(), bias, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("panel_mm(Tensor x, Tensor panels, Tensor bias, int n) -> Tensor");
  m.def("panel_mm_int8(Tensor x, Tensor panels, Tensor scales, Tensor bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("panel_mm", &panel_mm);
  m.impl("panel_mm_int8", &panel_mm_int8);
}
