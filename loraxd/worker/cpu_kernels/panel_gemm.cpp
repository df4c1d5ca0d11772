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

template <typename W, int Rows>
void tile(const float* __restrict x, int64_t K, const W* __restrict panel,
          const float* __restrict scale, const float* __restrict bias, float* __restrict y,
          int64_t ldy, int64_t cols) {
  v16 lo[Rows], hi[Rows];
  for (int m = 0; m < Rows; ++m) { lo[m] = v16{}; hi[m] = v16{}; }
  for (int64_t k = 0; k < K; ++k) {
    const W* row = panel + k * kCols;
    const char* ahead = reinterpret_cast<const char*>(row) + kAheadBytes;
    __builtin_prefetch(ahead, 0, 3);
    if constexpr (sizeof(W) * kCols > 64) __builtin_prefetch(ahead + 64, 0, 3);
    v16 w0, w1;
    load_row(row, w0, w1);
    for (int m = 0; m < Rows; ++m) {
      const float xv = x[m * K + k];
      lo[m] += xv * w0;
      hi[m] += xv * w1;
    }
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
using TileFn = void (*)(const float*, int64_t, const W*, const float*, const float*, float*,
                        int64_t, int64_t);
template <typename W>
constexpr TileFn<W> kTiles[kRowTile + 1] = {nullptr, tile<W, 1>, tile<W, 2>, tile<W, 3>,
                                            tile<W, 4>, tile<W, 5>, tile<W, 6>, tile<W, 7>,
                                            tile<W, 8>};

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
  const float* xp = x.data_ptr<float>();
  const W* pp = static_cast<const W*>(panels.data_ptr());
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t cols = std::min(kCols, n - p * kCols);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, M - m0);
        kTiles<W>[rows](xp + m0 * K, K, pp + p * K * kCols,
                        scale ? scale + p * kCols : nullptr, bp + p * kCols,
                        yp + m0 * n + p * kCols, n, cols);
      }
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
