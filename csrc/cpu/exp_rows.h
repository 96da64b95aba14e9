// Vectorisable exp of a shifted row for the CPU kernels (fused_loss.cpp, hier_loss.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "haframe_math.h"

namespace haframe {
namespace {

// exp(x) for x <= 0 (NaN propagates) as 2^n p(r): within 3e-7 relative of expf, and vectorisable; x < -87
// gives exp(-87), which callers keep out of their results.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below it every term is negligible next to the max's 1
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // x - n ln 2, two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// e_k = exp(z_k - m) for a finite row maximum m; compiled for AVX2 as well, chosen at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void exp_shifted_float(const float* __restrict z, float m, float* __restrict e, int64_t K) {
  for (int64_t k = 0; k < K; ++k) e[k] = exp_nonpositive(z[k] - m);
}

inline void exp_shifted(const float* z, float m, float* e, int64_t K) { exp_shifted_float(z, m, e, K); }
inline void exp_shifted(const double* z, double m, double* e, int64_t K) {
  for (int64_t k = 0; k < K; ++k) e[k] = hf_exp(z[k] - m);
}

}  // namespace
}  // namespace haframe
