// Vector basics shared by the CPU kernels (GCC vector extensions, 16 fp32 lanes).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace loraxd_vec {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));

// Loads widen to fp32, stores round to the element type (bf16: to nearest even, NaN kept
// quiet, as c10::BFloat16 does).
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 load(const c10::BFloat16* p) {  // a bf16 is the high half of its fp32
  vh16 h;
  std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, vu16) << 16);
}
inline vu16 bf16_bits(v16 v) {  // the bf16 in the high half of each lane
  const vu16 u = (vu16)v;
  const vu16 r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return v != v ? vu16{} + 0x7FC00000u : r;
}
inline void store(c10::BFloat16* p, v16 v) {
  const vh16 h = __builtin_convertvector(bf16_bits(v) >> 16, vh16);
  std::memcpy(p, &h, sizeof h);
}

inline v16 splat(float x) { return v16{} + x; }

// e^x for x <= 0 (e.g. a score minus its row's maximum), within about 1 ulp: x = k ln2 + r
// with |r| <= ln2 / 2, e^r by its degree-6 minimax polynomial, 2^k put in the exponent bits.
// Below -87 (e^x < 2e-38) it returns e^-87. NaN stays NaN.
inline v16 exp_nonpositive(v16 x) {
  const v16 lo = splat(-87.f);
  x = x < lo ? lo : x;
  const v16 shifter = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 k = (x * 1.44269504088896341f + shifter) - shifter;
  const v16 r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi16 bits = (__builtin_convertvector(k, vi16) + 127) << 23;
  return p * (v16)bits;  // a cast between vector types keeps the bits
}

}  // namespace loraxd_vec
