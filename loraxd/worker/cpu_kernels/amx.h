// What the AMX kernels share: whether this process may use AMX, the tile configuration,
// and the epilogue's loads and stores (vec_math.h).
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace loraxd_amx {

using loraxd_vec::load;
using loraxd_vec::store;
using loraxd_vec::v16;

constexpr int64_t kTileRows = 16;  // rows of a tile
constexpr int64_t kRowBytes = 64;  // bytes of a tile row
constexpr int64_t kTileN = 16;     // output columns per C tile (16 fp32 or int32)

// The CPU has AMX-TILE and AMX-BF16 (`int8`: AMX-INT8 too) and Linux lets this process
// use the tile state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
inline bool usable(bool int8) {
  static const unsigned edx = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0u;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return 0u;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? d : 0u;
  }();
  return edx != 0 && (!int8 || (edx & (1u << 25)));
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int64_t r, int64_t bytes = kRowBytes) {
    rows[tile] = static_cast<uint8_t>(r);
    colsb[tile] = r ? static_cast<uint16_t>(bytes) : 0;
  }
};

constexpr int64_t kBTileBytes = kTileRows * kRowBytes;  // a B tile, read as one
constexpr int64_t kAheadTiles = 4;  // how far ahead in its stream a B tile is prefetched
constexpr int64_t kPassCols = 2 * kTileN;  // C columns of a pass: two column tiles

// A pass's four tile products, C00 += A0 B0, C01 += A0 B1, C10 += A1 B0, C11 += A1 B1,
// with the kernel's instruction: tile numbers must be literals in it.
#define LORAXD_AMX_PRODUCT(name, insn)           \
  struct name {                                  \
    static void c00() { insn(0, 4, 6); }         \
    static void c01() { insn(1, 4, 7); }         \
    static void c10() { insn(2, 5, 6); }         \
    static void c11() { insn(3, 5, 7); }         \
  }

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8")

// Tile numbers are part of the instruction, so the code spells them:
// C00 0, C01 1, C10 2, C11 3 (A tile, column tile); A0 4, A1 5; B0 6, B1 7.
inline void configure(TileConfig& cfg, int64_t rows) {
  cfg = TileConfig{};
  const int64_t r0 = std::min(rows, kTileRows), r1 = rows - r0;
  cfg.set(0, r0), cfg.set(1, r0), cfg.set(2, r1), cfg.set(3, r1), cfg.set(4, r0);
  cfg.set(5, r1), cfg.set(6, kTileRows), cfg.set(7, kTileRows);
  _tile_loadconfig(&cfg);
}

inline void prefetch_tile(const char* tile) {
  for (int64_t line = 0; line < kBTileBytes; line += 64) _mm_prefetch(tile + line, _MM_HINT_T0);
}

// One pass: MT A tiles (rows a_stride bytes apart, the second 16 rows below the first,
// K step k at a + k * a_step) by NT column tiles (B tile of K step k at b[n] + k *
// kBTileBytes) over KS K steps; the 4-byte sums to c [32][32]. `Product` is the kernel's
// tile product (LORAXD_AMX_PRODUCT). Tiles are not renamed, so a load into a tile waits for the
// products that read it: each tile of the next K step is loaded as soon as this step's
// last product with it is issued, to overlap the next products.
template <typename Product, int MT, int NT>
inline void pass(const char* a, int64_t a_stride, int64_t a_step, const char* const* b,
                 int64_t KS, void* c) {
  constexpr int64_t cstride = kPassCols * 4;
  const char* a1 = a + kTileRows * a_stride;
  char* cb = static_cast<char*>(c);
  _tile_zero(0);
  if (NT == 2) _tile_zero(1);
  if (MT == 2) { _tile_zero(2); if (NT == 2) _tile_zero(3); }
  _tile_loadd(4, a, a_stride);
  _tile_loadd(6, b[0], kRowBytes);
  if (NT == 2) _tile_loadd(7, b[1], kRowBytes);
  if (MT == 2) _tile_loadd(5, a1, a_stride);
  for (int64_t k = 0; k < KS; ++k) {
    const bool more = k + 1 < KS;
    const int64_t na = (k + 1) * a_step, nb = (k + 1) * kBTileBytes;
    prefetch_tile(b[0] + (k + kAheadTiles) * kBTileBytes);
    if (NT == 2) prefetch_tile(b[1] + (k + kAheadTiles) * kBTileBytes);
    Product::c00();
    if (NT == 2) Product::c01();
    if (more) _tile_loadd(4, a + na, a_stride);
    if (MT == 2) {
      Product::c10();
      if (more) _tile_loadd(6, b[0] + nb, kRowBytes);
      if (NT == 2) Product::c11();
      if (more) {
        _tile_loadd(5, a1 + na, a_stride);
        if (NT == 2) _tile_loadd(7, b[1] + nb, kRowBytes);
      }
    } else if (more) {
      _tile_loadd(6, b[0] + nb, kRowBytes);
      if (NT == 2) _tile_loadd(7, b[1] + nb, kRowBytes);
    }
  }
  _tile_stored(0, cb, cstride);
  if (NT == 2) _tile_stored(1, cb + kTileN * 4, cstride);
  if (MT == 2) {
    _tile_stored(2, cb + kTileRows * cstride, cstride);
    if (NT == 2) _tile_stored(3, cb + kTileRows * cstride + kTileN * 4, cstride);
  }
}

// The pass of `a_rows` A rows (two A tiles past 16) over column tile t0 and, when nt is 2,
// t0 + 1 of `tiles` (each column tile's KS B tiles in a row).
template <typename Product>
inline void block_pass(const char* a, int64_t a_rows, int64_t a_stride, int64_t a_step,
                       const void* tiles, int64_t t0, int nt, int64_t KS, void* c) {
  const char* base = static_cast<const char*>(tiles);
  const char* b[2] = {base + t0 * KS * kBTileBytes, base + (t0 + 1) * KS * kBTileBytes};
  if (a_rows > kTileRows) {
    nt == 2 ? pass<Product, 2, 2>(a, a_stride, a_step, b, KS, c)
            : pass<Product, 2, 1>(a, a_stride, a_step, b, KS, c);
  } else {
    nt == 2 ? pass<Product, 1, 2>(a, a_stride, a_step, b, KS, c)
            : pass<Product, 1, 1>(a, a_stride, a_step, b, KS, c);
  }
}

#pragma GCC pop_options

}  // namespace loraxd_amx
