// CPU kernels of the hierarchical losses (HXE, soft labels, CE) with a trainable classifier: row chunks one
// after another, BLAS (through ATen) for the three GEMMs of a chunk (logits, d features, d weight), and the
// rows of a chunk's epilogue in parallel, each O(K + L) over the depth-first segments of its label path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "hier_loss_checks.h"
#include "hier_math.h"
#include "exp_rows.h"

namespace haframe {
namespace {

constexpr int64_t kHierChunkBytes = int64_t(64) << 20;  // logits of one row chunk

template <typename T>
T row_max(const T* z, int64_t K) {
  T mx[8];
  std::fill(mx, mx + 8, T(-INFINITY));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int j = 0; j < 8; ++j) mx[j] = z[k + j] > mx[j] ? z[k + j] : mx[j];
  T m = -INFINITY;
  for (; k < K; ++k) m = z[k] > m ? z[k] : m;
  for (int j = 0; j < 8; ++j) m = mx[j] > m ? mx[j] : m;
  return m;
}

// Calls f(c) for every class c of segment s (c = order[position], or the position itself without order).
template <typename F>
inline void for_segment(const HierSeg& s, const int64_t* order, F&& f) {
  if (order) {
    for (int64_t j = s.a0; j < s.b0; ++j) f(order[j]);
    for (int64_t j = s.a1; j < s.b1; ++j) f(order[j]);
  } else {
    for (int64_t j = s.a0; j < s.b0; ++j) f(j);
    for (int64_t j = s.a1; j < s.b1; ++j) f(j);
  }
}

// Per-row scratch: exp(z - max) [K] and four path-sized arrays.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> e, lse, coef, segz;
  std::vector<char> direct;
  RowScratch(int64_t K, int64_t P) : e(K), lse(P), coef(P), segz(P), direct(P) {}
};

// Loss of one row and, when scale != 0, its logit gradient times scale written over the logits.
template <typename acc_t>
acc_t hier_row(acc_t* z,              // [K] logits in (label order), gradient out
               const int64_t* order,  // [K] label at each depth-first position, or nullptr (identity)
               const int64_t* ps,     // [P] path ranges, by depth
               const int64_t* pe,     // [P]
               const double* pv,      // [P] HXE weights / soft-label kernel values
               int64_t P, int64_t K, int64_t kind, bool need_grad, acc_t scale, RowScratch<acc_t>& s) {
  const int64_t L = hier_path_last(ps, P);
  acc_t m = row_max(z, K);
  if (!(m > -INFINITY && m < INFINITY)) m = 0;  // all -inf, an inf or NaN: let the sums carry it
  acc_t* e = s.e.data();
  exp_shifted(z, m, e, K);
  const bool soft = kind == kHierSoft;
  for (int64_t i = L; i >= 0; --i) {  // each segment's logsumexp (and logit sum)
    const HierSeg g = hier_segment(ps, pe, i, L);
    acc_t sum = 0, zs = 0;
    for_segment(g, order, [&](int64_t c) { sum += e[c]; });
    if (soft) for_segment(g, order, [&](int64_t c) { zs += z[c]; });
    s.segz[i] = zs;
    s.direct[i] = 0;
    const bool empty = g.b0 <= g.a0 && g.b1 <= g.a1;
    if (empty) {
      s.lse[i] = -INFINITY;
    } else if (sum >= hier_tiny_sum<acc_t>() || !(sum == sum)) {
      s.lse[i] = m + hf_log(sum);
    } else {  // every term underflowed (or was clamped): about the segment's own maximum
      acc_t sm = -INFINITY, t = 0;
      for_segment(g, order, [&](int64_t c) { sm = z[c] > sm ? z[c] : sm; });
      if (sm > -INFINITY) for_segment(g, order, [&](int64_t c) { t += hf_exp(z[c] - sm); });
      s.lse[i] = sm > -INFINITY ? sm + hf_log(t) : acc_t(-INFINITY);
      s.direct[i] = 1;
    }
  }
  hier_nested_lse(s.lse.data(), L);
  acc_t loss = soft ? soft_finish(s.lse.data(), pv, ps, pe, L, s.segz.data(), s.coef.data())
                    : hxe_finish(s.lse.data(), pv, L, s.coef.data());
  if (!need_grad) return loss;
  for (int64_t i = 0; i <= L; ++i) {
    const HierSeg g = hier_segment(ps, pe, i, L);
    const acc_t lse = soft ? s.lse[0] : s.lse[i];
    const acc_t k = soft ? -s.coef[i] : acc_t(0);  // soft: p - q_i
    const acc_t D = soft ? acc_t(1) : s.coef[i];
    if (s.direct[i]) {
      for_segment(g, order, [&](int64_t c) { z[c] = scale * (hf_exp(z[c] - lse) * D + k); });
    } else {
      const acc_t f = hf_exp(m - lse) * D;
      for_segment(g, order, [&](int64_t c) { z[c] = scale * (e[c] * f + k); });
    }
  }
  return loss;
}

template <typename acc_t>
void hier_loss_cpu_impl(const at::Tensor& h,      // [B, d]
                        const at::Tensor& W,      // [K, d]
                        const at::Tensor& b,      // [K] or undefined
                        const int64_t* order,     // [K] or nullptr
                        const at::Tensor& ps,     // [B, P]
                        const at::Tensor& pe,     // [B, P]
                        const at::Tensor& pv,     // [B, P]
                        int64_t kind,
                        const acc_t* row_scale,   // [B] or nullptr
                        acc_t gscale, bool need_grad, bool need_weight_grad,
                        acc_t* loss,              // [B]
                        at::Tensor& gh,           // [B, d] or empty
                        at::Tensor& gW,           // [K, d] or empty
                        at::Tensor& gb) {         // [K] or empty
  const int64_t B = h.size(0), K = W.size(0), P = ps.size(1);
  const int64_t cap = rows_per_chunk(B, K, sizeof(acc_t), kHierChunkBytes);
  const int64_t nchunks = (B + cap - 1) / cap;
  const int64_t rows = (B + nchunks - 1) / nchunks;  // equal chunks
  const bool any_grad = need_grad || need_weight_grad;
  at::Tensor zbuf = at::empty({rows, K}, h.options());
  const int64_t *psp = ps.data_ptr<int64_t>(), *pep = pe.data_ptr<int64_t>();
  const double* pvp = pv.data_ptr<double>();
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t nr = std::min(rows, B - r0);
    const at::Tensor hc = h.narrow(0, r0, nr);
    at::Tensor z = zbuf.narrow(0, 0, nr);
    if (b.defined()) at::addmm_out(z, b, hc, W.t());
    else at::mm_out(z, hc, W.t());
    acc_t* zp = z.data_ptr<acc_t>();
    at::parallel_for(0, nr, 1, [&](int64_t i0, int64_t i1) {
      RowScratch<acc_t> s(K, P);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = r0 + i;
        const acc_t scale = gscale * (row_scale ? row_scale[r] : acc_t(1));
        loss[r] = hier_row<acc_t>(zp + i * K, order, psp + r * P, pep + r * P, pvp + r * P, P, K, kind, any_grad,
                                  scale, s);
      }
    });
    if (need_grad) {
      at::Tensor out = gh.narrow(0, r0, nr);
      at::mm_out(out, z, W);
    }
    if (need_weight_grad) {  // the first chunk writes dW (no zero fill to read back), the others add to it
      if (r0 == 0) {
        at::mm_out(gW, z.t(), hc);
        at::sum_out(gb, z, 0);
      } else {
        gW.addmm_(z.t(), hc);
        gb.add_(z.sum(0));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hier_loss_cpu(
    const at::Tensor& features,                   // [B, d]
    const at::Tensor& weight,                     // [K, d]
    const c10::optional<at::Tensor>& bias,        // [K]
    const c10::optional<at::Tensor>& order,       // [K]
    const at::Tensor& path_start,                 // [B, P]
    const at::Tensor& path_end,                   // [B, P]
    const at::Tensor& path_value,                 // [B, P]
    int64_t kind,
    const c10::optional<at::Tensor>& row_scale,   // [B]
    int64_t reduction, bool need_grad, bool need_weight_grad) {
  check_hier_loss_inputs(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction);
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor h = features.to(acc).contiguous();
  const at::Tensor W = weight.to(acc).contiguous();
  const at::Tensor bb = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor ord = order.has_value() ? order->contiguous() : at::Tensor();
  const at::Tensor ps = path_start.contiguous(), pe = path_end.contiguous(), pv = path_value.contiguous();
  const at::Tensor rs = row_scale.has_value() ? row_scale->to(acc).contiguous() : at::Tensor();
  at::Tensor rows = at::empty({B}, h.options());
  at::Tensor gh = need_grad ? at::empty({B, d}, h.options()) : at::empty({0}, h.options());
  at::Tensor gW = need_weight_grad ? at::empty({K, d}, h.options()) : at::empty({0}, h.options());  // B > 0: written
  at::Tensor gb = need_weight_grad ? at::empty({K}, h.options()) : at::empty({0}, h.options());
  if (need_weight_grad && B == 0) {
    gW.zero_();
    gb.zero_();
  }
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(acc, "haframe_hier_loss_cpu", [&] {
    const scalar_t gscale = reduction == kMean ? (B > 0 ? scalar_t(1) / B : scalar_t(0)) : scalar_t(1);
    if (B > 0)
      hier_loss_cpu_impl<scalar_t>(h, W, bb, ord.defined() ? ord.data_ptr<int64_t>() : nullptr, ps, pe, pv, kind,
                                   rs.defined() ? rs.data_ptr<scalar_t>() : nullptr, gscale, need_grad,
                                   need_weight_grad, rows.data_ptr<scalar_t>(), gh, gW, gb);
    if (reduction == kNone) {
      loss = rows;
    } else {
      double total = 0;
      const scalar_t* rp = rows.data_ptr<scalar_t>();
      for (int64_t i = 0; i < B; ++i) total += rp[i];
      if (reduction == kMean) total = B > 0 ? total / B : std::nan("");
      loss = at::scalar_tensor(total, h.options());
    }
  });
  if (need_grad) gh = gh.to(features.scalar_type());
  if (need_weight_grad) {
    gW = gW.to(weight.scalar_type());
    gb = gb.to(weight.scalar_type());
  }
  return {loss, gh, gW, gb};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CPU, m) { m.impl("hier_loss", &haframe::hier_loss_cpu); }
