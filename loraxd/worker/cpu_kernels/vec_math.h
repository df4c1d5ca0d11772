// Vector basics shared by the CPU kernels (GCC vector extensions, 16 fp32 lanes).
#pragma once

#include <cstdint>

namespace loraxd_vec {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

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
