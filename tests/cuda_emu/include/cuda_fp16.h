// CPU stand-in for cuda_fp16.h (tests/cuda_emu): IEEE half through GCC's _Float16.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  _Float16 v;
};
inline float __half2float(__half x) { return static_cast<float>(x.v); }
inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
