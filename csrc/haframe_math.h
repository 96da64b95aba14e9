// Per-row math of the fused HAFrame loss, shared by the CPU and CUDA kernels (one source of truth).
//
// Row b: h (d), y (label), z = W h (K logits), n = ||h||, inv_n = 1/n (0 for a zero row),
// inv_wn[k] = 1/||w_k||, cos_k = z_k inv_wn[k] inv_n.
//   loss  = (1 - a) (lse(z) - z_y) + a sum_k r_k^2,           r_k = cos_k - S[y, k]
//   dh    = W^T G - c h                                         (the "gather" route)
//           G_k = (1 - a)(p_k - [k == y]) + 2 a inv_n inv_wn[k] r_k,  c = 2 a inv_n^2 sum_k r_k cos_k
// With unit rows and S = W W^T the cosine term is u^T M u, u = h inv_n - w_y, M = W^T W (the "M"
// route): with v = M u, loss_cos = u.v and dh_cos = 2 a inv_n (v - hh (hh.v)), hh = h inv_n.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif

namespace haframe {

// Feature rows with ||h|| <= kEps count as zero: cosines 0, no cosine gradient.
constexpr double kEps = 1e-8;

HF_HD float hf_exp(float x) { return expf(x); }
HF_HD double hf_exp(double x) { return exp(x); }
HF_HD float hf_log(float x) { return logf(x); }
HF_HD double hf_log(double x) { return log(x); }
HF_HD float hf_sqrt(float x) { return sqrtf(x); }
HF_HD double hf_sqrt(double x) { return sqrt(x); }

// 1/||h|| from the squared norm; 0 for a zero (or NaN) row.
template <typename T>
HF_HD T inv_norm(T sumsq) {
  T n = hf_sqrt(sumsq);
  return n > T(kEps) ? T(1) / n : T(0);
}

// Online logsumexp state: running max m and sum s of exp(z - m).
template <typename T>
struct Lse {
  T m;
  T s;
};

template <typename T>
HF_HD Lse<T> lse_empty() {
  return Lse<T>{-INFINITY, T(0)};
}

// Adds one logit to the running logsumexp (NaN propagates into s).
template <typename T>
HF_HD void lse_push(Lse<T>& a, T z) {
  if (z > a.m) {
    a.s = a.s * hf_exp(a.m - z) + T(1);
    a.m = z;
  } else {
    a.s += hf_exp(z - a.m);
  }
}

// Merges two partial logsumexp states.
template <typename T>
HF_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  T m = a.m > b.m ? a.m : b.m;
  return Lse<T>{m, a.s * hf_exp(a.m - m) + b.s * hf_exp(b.m - m)};
}

template <typename T>
HF_HD T lse_value(Lse<T> a) {
  return a.m + hf_log(a.s);
}

// Cosine residual r_k = cos(w_k, h) - S[y, k]; also returns cos_k.
template <typename T>
HF_HD T cos_residual(T z, T inv_wn, T inv_n, T s_ky, T* cos_out) {
  T c = z * inv_wn * inv_n;
  *cos_out = c;
  return c - s_ky;
}

// G_k of the gather route: CE gradient plus the cosine term's logit-space gradient.
template <typename T>
HF_HD T gather_grad_coef(T p, bool is_y, T r, T inv_wn, T inv_n, T alpha) {
  return (T(1) - alpha) * (p - (is_y ? T(1) : T(0))) + T(2) * alpha * inv_n * inv_wn * r;
}

// G_k of the M route: the CE part only.
template <typename T>
HF_HD T ce_grad_coef(T p, bool is_y, T alpha) {
  return (T(1) - alpha) * (p - (is_y ? T(1) : T(0)));
}

// Per-row loss from its logsumexp, the label's logit and the cosine term.
template <typename T>
HF_HD T row_loss(T lse, T z_y, T lcos, T alpha) {
  return (T(1) - alpha) * (lse - z_y) + alpha * lcos;
}

// Coefficient c of the gather route's correction dh -= c h.
template <typename T>
HF_HD T gather_h_coef(T sum_rc, T inv_n, T alpha) {
  return T(2) * alpha * inv_n * inv_n * sum_rc;
}

// M route: u_j = h_j inv_n - w_yj.
template <typename T>
HF_HD T mroute_u(T h_j, T inv_n, T wy_j) {
  return h_j * inv_n - wy_j;
}

// M route: dh_cos_j = 2 a inv_n (v_j - hh_j hh.v), with hv = hh.v.
template <typename T>
HF_HD T mroute_grad(T v_j, T h_j, T inv_n, T hv, T alpha) {
  return T(2) * alpha * inv_n * (v_j - h_j * inv_n * hv);
}

}  // namespace haframe
