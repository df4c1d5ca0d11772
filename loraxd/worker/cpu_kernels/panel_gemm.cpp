// y = x @ W.T (+ bias) in fp32 for a CPU, with W stored as panels of 32 output columns:
// panels[p][k][j] = W[32p + j][k] (zero rows past N). One panel is read front to back as a
// stream while a tile of up to 8 rows of x accumulates in 16 vector registers, so the
// weight, the step's biggest read, is pulled from memory once per call at close to the
// machine's read bandwidth (oneDNN's and MKL's skinny fp32 GEMMs reach about half of it
// on the weights of a decode step). Every output is a plain k-ordered sum, so a row's
// result does not depend on how many rows share the call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kCols = 32;      // a panel's width: two vectors
constexpr int64_t kRowTile = 8;    // rows of x per pass over a panel: 16 accumulators
constexpr int64_t kAhead = 32;     // prefetch distance in panel rows (4 KiB)

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }

template <int Rows>
void tile(const float* __restrict x, int64_t K, const float* __restrict panel,
          const float* __restrict bias, float* __restrict y, int64_t ldy, int64_t cols) {
  v16 lo[Rows], hi[Rows];
  const v16 b0 = load(bias), b1 = load(bias + 16);
  for (int m = 0; m < Rows; ++m) { lo[m] = v16{}; hi[m] = v16{}; }
  for (int64_t k = 0; k < K; ++k) {
    const float* row = panel + k * kCols;
    __builtin_prefetch(row + kAhead * kCols, 0, 3);
    __builtin_prefetch(row + kAhead * kCols + 16, 0, 3);
    const v16 w0 = load(row), w1 = load(row + 16);
    for (int m = 0; m < Rows; ++m) {
      const float xv = x[m * K + k];
      lo[m] += xv * w0;
      hi[m] += xv * w1;
    }
  }
  for (int m = 0; m < Rows; ++m) {
    float out[kCols];
    const v16 a = lo[m] + b0, b = hi[m] + b1;
    std::memcpy(out, &a, sizeof a);
    std::memcpy(out + 16, &b, sizeof b);
    std::memcpy(y + m * ldy, out, cols * sizeof(float));
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t,
                        int64_t);
constexpr TileFn kTiles[kRowTile + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                         tile<5>, tile<6>, tile<7>, tile<8>};

at::Tensor panel_mm(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& bias,
                    int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "panel_mm: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat &&
              panels.is_contiguous() && panels.size(2) == kCols,
              "panel_mm: panels must be contiguous float32 [P, K, 32]");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "panel_mm: x has ", K, " columns, the panels ",
              panels.size(1), " rows");
  TORCH_CHECK(n > (P - 1) * kCols && n <= P * kCols, "panel_mm: ", n,
              " outputs do not fit ", P, " panels");
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
              bias.size(0) == P * kCols, "panel_mm: bias must be float32 [P * 32]");
  at::Tensor y = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t cols = std::min(kCols, n - p * kCols);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, M - m0);
        kTiles[rows](xp + m0 * K, K, pp + p * K * kCols, bp + p * kCols,
                     yp + m0 * n + p * kCols, n, cols);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("panel_mm(Tensor x, Tensor panels, Tensor bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("panel_mm", &panel_mm);
}
