// Per-row math of the hierarchical losses (HXE, soft labels, CE), shared by the CPU and CUDA kernels.
//
// Classes are in depth-first order, so the label's root path v_0 (root), ..., v_L (its leaf) is L + 1
// nested position ranges [start_i, end_i). Segment i = range(v_i) minus range(v_{i+1}) (segment L: the
// leaf); every class in segment i has v_i as its LCA with the label. From lseg_i, the logsumexp of the
// logits of segment i:
//   lse_i = logsumexp over range(v_i) = logaddexp(lse_{i+1}, lseg_i)
//   HXE:  loss = sum_{i=1..L} w_i (lse_{i-1} - lse_i);  dloss/dz_c = exp(z_c - lse_i) D_i on segment i,
//         D_0 = c_0, D_i = D_{i-1} exp(lse_i - lse_{i-1}) + c_i,  c_i = w_{i+1} [i < L] - w_i [i >= 1]
//   soft: q_i = f_i / sum_k f_k n_k (n_k: classes in segment k), loss = lse_0 - sum_i q_i sum_{c in seg i} z_c,
//         dloss/dz_c = exp(z_c - lse_0) - q_i on segment i
// CE is HXE on the path root -> y with w_1 = 1.
#pragma once

#include <cmath>
#include <cstdint>

#include "haframe_math.h"

namespace haframe {

// Kinds of the op: the telescoping HXE form (CE included) and the soft-target form.
enum HierKind : int64_t { kHierTelescoping = 0, kHierSoft = 1 };

// The positions of segment i of a path: [a0, b0) and [a1, b1) (either may be empty).
struct HierSeg {
  int64_t a0, b0, a1, b1;
};

HF_HD HierSeg hier_segment(const int64_t* start, const int64_t* end, int64_t i, int64_t L) {
  if (i == L) return HierSeg{start[L], end[L], 0, 0};
  return HierSeg{start[i], start[i + 1], end[i + 1], end[i]};
}

// L of a path row of P entries (entries past the label's depth have start < 0).
HF_HD int64_t hier_path_last(const int64_t* start, int64_t P) {
  int64_t L = 0;
  while (L + 1 < P && start[L + 1] >= 0) ++L;
  return L;
}

// A sum of exp(z - rowmax) below this may hold underflowed (or, with a clamped exp, inflated) terms: such a
// segment's logsumexp is recomputed about its own maximum.
template <typename T>
HF_HD T hier_tiny_sum();
template <>
HF_HD float hier_tiny_sum<float>() { return 1e-25f; }
template <>
HF_HD double hier_tiny_sum<double>() { return 1e-280; }

template <typename T>
HF_HD T hf_log1p(T x);
template <>
HF_HD float hf_log1p<float>(float x) { return log1pf(x); }
template <>
HF_HD double hf_log1p<double>(double x) { return log1p(x); }

// log(exp(a) + exp(b)), exact for -inf operands.
template <typename T>
HF_HD T log_add_exp(T a, T b) {
  if (a < b) {
    const T t = a;
    a = b;
    b = t;
  }
  if (b == -INFINITY) return a;
  return a + hf_log1p(hf_exp(b - a));
}

// Turns lse[0..L] from segment logsumexps into nested range logsumexps (in place).
template <typename T>
HF_HD void hier_nested_lse(T* lse, int64_t L) {
  for (int64_t i = L - 1; i >= 0; --i) lse[i] = log_add_exp(lse[i + 1], lse[i]);
}

// HXE: the row loss, and D[0..L] (gradient exp(z - lse_i) D_i on segment i); w: path weights (w[0] unused).
template <typename T>
HF_HD T hxe_finish(const T* lse, const double* w, int64_t L, T* D) {
  T loss = 0;
  for (int64_t i = 1; i <= L; ++i) loss += T(w[i]) * (lse[i - 1] - lse[i]);
  for (int64_t i = 0; i <= L; ++i) {
    const T c = (i < L ? T(w[i + 1]) : T(0)) - (i >= 1 ? T(w[i]) : T(0));
    D[i] = i == 0 ? c : D[i - 1] * hf_exp(lse[i] - lse[i - 1]) + c;
  }
  return loss;
}

// Soft labels: q[0..L] (the target probability of each class of segment i) and the row loss from segz[i],
// the sum of the logits of segment i; f: the path's exp(-beta level / d_max).
template <typename T>
HF_HD T soft_finish(const T* lse, const double* f, const int64_t* start, const int64_t* end, int64_t L, const T* segz,
                    T* q) {
  double Z = 0;
  for (int64_t i = 0; i <= L; ++i) {
    const int64_t inner = i < L ? end[i + 1] - start[i + 1] : 0;
    Z += f[i] * double(end[i] - start[i] - inner);
  }
  T loss = lse[0];
  for (int64_t i = 0; i <= L; ++i) {
    q[i] = T(f[i] / Z);
    loss -= q[i] * segz[i];
  }
  return loss;
}

}  // namespace haframe
