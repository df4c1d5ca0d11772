// What the AMX kernels share: whether this process may use AMX, the tile configuration,
// and the epilogue's loads and stores (vec_math.h).
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vec_math.h"

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

}  // namespace loraxd_amx
