// y = x @ W.T (+ bias) for bf16 x and W on Intel AMX tiles (AMX-BF16): the CPU's tile
// unit multiplies bf16 pairs and sums them in fp32.
//
// W is held in AMX's own layout, tile after tile: tiles[t][kb][kp][n][2] =
// W[16t + n][32kb + 2kp + {0,1}] (16 output columns x 32 K values, 1 KB), so each B tile
// is one contiguous load. A call walks blocks of 32 output columns (two B tiles a K step;
// threads split the blocks) and, within a block, passes of up to 32 rows (two A tiles),
// the sums in up to four C tiles. One tile product does 16x16x32 multiply-adds in about
// 16 cycles, so up to 32-row passes the call is bound by reading the weight, where
// oneDNN's bf16 kernels reach about half the machine's bandwidth at decode sizes.
//
// A tile product of one row never sees another row, so a row's numbers do not depend on
// its batch. K must be a multiple of 32 and N of 16 (linear.py falls back otherwise).
#include "amx.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

using namespace loraxd_amx;
using bf16 = uint16_t;  // the bits

constexpr int64_t kTileK = 32;                   // K values per tile row
constexpr int64_t kBlockN = 2 * kTileN;          // output columns per block
constexpr int64_t kPassRows = 2 * kTileRows;     // rows per pass

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8")

LORAXD_AMX_PRODUCT(Bf16Product, _tile_dpbf16ps);

void run(const bf16* x, int64_t M, int64_t K, const bf16* tiles, int64_t NT, const float* bias,
         c10::BFloat16* y) {
  const int64_t KB = K / kTileK, N = NT * kTileN;
  at::parallel_for(0, (NT + 1) / 2, 1, [&](int64_t first, int64_t last) {
    TileConfig cfg;
    int64_t configured = -1;
    alignas(64) float c[kPassRows * kBlockN];
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = 2 * blk;
      const int nt = NT - t0 >= 2 ? 2 : 1;
      for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
        const int64_t rows = std::min(kPassRows, M - m0);
        if (rows != configured) configure(cfg, configured = rows);
        block_pass<Bf16Product>(reinterpret_cast<const char*>(x + m0 * K), rows,
                                K * sizeof(bf16), kTileK * sizeof(bf16), tiles, t0, nt, KB, c);
        for (int64_t m = 0; m < rows; ++m) {
          for (int64_t j = 0; j < nt * kTileN; j += kTileN) {
            const int64_t col = t0 * kTileN + j;
            store(y + (m0 + m) * N + col, load(c + m * kBlockN + j) + load(bias + col));
          }
        }
      }
    }
    _tile_release();
  });
}

#pragma GCC pop_options

at::Tensor amx_mm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& bias) {
  TORCH_CHECK(usable(false), "amx_mm: this CPU or kernel gives no AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "amx_mm: x must be a contiguous 2-D bfloat16 tensor");
  TORCH_CHECK(tiles.dim() == 5 && tiles.is_contiguous() && tiles.size(2) == kTileRows &&
              tiles.size(3) == kTileN && tiles.size(4) == 2 &&
              tiles.scalar_type() == at::kBFloat16,
              "amx_mm: tiles must be contiguous bfloat16 [N/16, K/32, 16, 16, 2]");
  const int64_t M = x.size(0), K = x.size(1), NT = tiles.size(0);
  TORCH_CHECK(K == tiles.size(1) * kTileK, "amx_mm: x has ", K, " columns, the tiles ",
              tiles.size(1) * kTileK);
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
              bias.size(0) == NT * kTileN, "amx_mm: bias must be float32 [N]");
  at::Tensor y = at::empty({M, NT * kTileN}, x.options());
  if (M == 0) return y;
  run(reinterpret_cast<const bf16*>(x.data_ptr()), M, K,
      reinterpret_cast<const bf16*>(tiles.data_ptr()), NT, bias.data_ptr<float>(),
      y.data_ptr<c10::BFloat16>());
  return y;
}

bool amx_usable(bool int8) { return usable(int8); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("amx_usable(bool int8) -> bool");
  m.def("amx_mm(Tensor x, Tensor tiles, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("amx_mm", &amx_mm);
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CompositeExplicitAutograd, m) {
  m.impl("amx_usable", &amx_usable);
}
