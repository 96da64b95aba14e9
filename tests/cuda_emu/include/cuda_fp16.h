// CPU stand-in for cuda_fp16.h (tests/cuda_emu): IEEE binary16 stored as bits, converted by hand
// (round to nearest even, subnormals, Inf and NaN), so no compiler support for a half type is needed.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu, man = x.bits & 0x3ffu, u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;  // +-0
  } else {  // subnormal: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to Inf
  if (a < 0x33000001u) return __half{sign};                                 // rounds to +-0
  const int exp = static_cast<int>(a >> 23) - 127;
  uint32_t man = (a & 0x7fffffu) | 0x800000u;  // with the implicit bit
  const int shift = exp >= -14 ? 13 : 13 + (-14 - exp);  // normal, or subnormal with extra shift
  uint32_t h = man >> shift;
  const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;  // round to nearest even (may carry into the exponent)
  if (exp >= -14) h = (static_cast<uint32_t>(exp + 15) << 10) + (h - 0x400u);
  return __half{static_cast<uint16_t>(sign | h)};
}
