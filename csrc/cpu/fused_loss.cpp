// CPU kernels of the fused HAFrame loss: row blocks one after another, BLAS (through ATen, threaded by
// MKL) for the K-sized products of a block, and one fused pass over the block's logits for softmax, CE and
// the cosine term, its rows shared among the threads in small chunks taken in turn.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "fused_loss_checks.h"
#include "haframe_math.h"
#include "exp_rows.h"

namespace haframe {
namespace {

// Threading.  Blocks run one at a time; inside a block the GEMMs are MKL's own threaded calls over the
// whole block, and the row loops are cut into chunks of about kCpuChunkElems values that the threads take
// from a shared counter.  A thread that loses its core to another process (a data loader, another
// training run) then holds the step back by one chunk, where a fixed share of rows per thread would make
// the step wait for that thread's whole share (measured: 2.5x the quiet time at B = 1024, K = 10^4).
// A block holds up to kCpuBlockBytes of logits, with one thread or several: each parallel region ends in a
// barrier, so fewer, larger blocks wait less on a descheduled thread, every block streams all of W from
// memory (200 MB at K = 10^5, d = 512), and the GEMMs run at MKL's full rate on many rows (B = 1024,
// K = 10^4, d = 512: 64 MiB against 4 MiB blocks, 1.09x against 1.30x the two GEMMs alone with one thread;
// bench/RESULTS.md). Blocks are of equal size, within a row.
constexpr int64_t kCpuBlockBytes = int64_t(64) << 20;
constexpr int64_t kCpuParallelMacs = int64_t(1) << 21;  // B K d below which one thread does the work
constexpr int64_t kCpuChunkElems = int64_t(1) << 14;    // values per chunk of a row loop (64 KiB of float)

constexpr int kLanes = 8;  // independent partial sums, so that the compiler vectorises the reductions

// sum_j a[j] b[j] with kLanes partial sums.
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T p[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) p[j] += a[k + j] * b[k + j];
  T s = 0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < kLanes; ++j) s += p[j];
  return s;
}

// Logsumexp of one row; writes e_k = exp(z_k - max) into e and returns their sum in *sum_out.
template <typename acc_t>
acc_t row_lse(const acc_t* z, acc_t* e, int64_t K, acc_t* sum_out) {
  acc_t mx[kLanes];
  std::fill(mx, mx + kLanes, acc_t(-INFINITY));
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) mx[j] = z[k + j] > mx[j] ? z[k + j] : mx[j];  // NaN skipped here,
  acc_t m = -INFINITY;                                                              // caught by the sum
  for (; k < K; ++k) m = z[k] > m ? z[k] : m;
  for (int j = 0; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
  if (m == -INFINITY || m == INFINITY) {
    m = 0;  // all -inf or an inf: let the sum carry inf/NaN
    for (k = 0; k < K; ++k) e[k] = hf_exp(z[k] - m);
  } else {
    exp_shifted(z, m, e, K);  // every z - m <= 0 here (or NaN, which propagates)
  }
  acc_t p[kLanes] = {};
  for (k = 0; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) p[j] += e[k + j];
  acc_t s = 0;
  for (; k < K; ++k) s += e[k];
  for (int j = 0; j < kLanes; ++j) s += p[j];
  *sum_out = s;
  return m + hf_log(s);
}

// f(i0, i1) over the chunks [i0, i1) of [0, n), `chunk` rows each, taken in turn from a shared counter by
// the threads; setup() runs once per thread first and its result is passed to f (per-thread scratch).
// Every row gives the same result whichever thread computes it.
template <typename Setup, typename F>
void dynamic_chunks(int64_t n, int64_t chunk, bool threaded, const Setup& setup, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (!threaded || nchunks < 2) {
    auto scratch = setup();
    if (n > 0) f(int64_t(0), n, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(nchunks, std::max(1, at::get_num_threads()));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    auto scratch = setup();
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < nchunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      f(c * chunk, std::min(n, (c + 1) * chunk), scratch);
  });
}

// Loss, G (in place of the logits) and the h-correction of the rows of one block.
template <typename acc_t>
void block_epilogue(acc_t* z,              // [nr, K] logits in, G out
                    const acc_t* h,        // [nr, d]
                    const int64_t* y,      // [nr]
                    const acc_t* inv_wn,   // [K]
                    const acc_t* S,        // [K, K] or nullptr (M route)
                    const acc_t* W,        // [K, d]
                    int64_t nr, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index, bool need_grad,
                    acc_t gscale,          // gradient scale (1/n_valid for mean)
                    acc_t* e,              // [K] scratch
                    acc_t* loss,           // [nr]
                    acc_t* coef,           // [nr] gather route: dh -= coef h
                    acc_t* inv_n_out,      // [nr]
                    acc_t* u) {            // [nr, d] M route: u = h inv_n - w_y
  for (int64_t i = 0; i < nr; ++i) {
    acc_t* zr = z + i * K;
    const acc_t* hr = h + i * d;
    const int64_t label = y[i];
    coef[i] = 0;
    if (label == ignore_index) {
      loss[i] = 0;
      inv_n_out[i] = 0;
      if (need_grad) std::fill(zr, zr + K, acc_t(0));
      if (u) std::fill(u + i * d, u + (i + 1) * d, acc_t(0));
      continue;
    }
    const acc_t inv_n = inv_norm(dot(hr, hr, d));
    inv_n_out[i] = inv_n;
    acc_t s;
    const acc_t lse = row_lse(zr, e, K, &s);
    const acc_t z_y = zr[label];
    const acc_t inv_s = acc_t(1) / s;
    acc_t lcos = 0;
    if (S) {
      const acc_t* srow = S + label * K;  // row y of S: the target of label y
      acc_t pl[kLanes] = {}, pr[kLanes] = {};
      // one class: accumulate r^2 and r cos into lane j, write G over the logit
      auto step = [&](int64_t k, int j) {
        acc_t c;
        const acc_t r = cos_residual(zr[k], inv_wn[k], inv_n, srow[k], &c);
        pl[j] += r * r;
        pr[j] += r * c;
        if (need_grad) zr[k] = gscale * gather_grad_coef(e[k] * inv_s, k == label, r, inv_wn[k], inv_n, alpha);
      };
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes)
        for (int j = 0; j < kLanes; ++j) step(k + j, j);
      for (; k < K; ++k) step(k, 0);
      acc_t rc = 0;
      for (int j = 0; j < kLanes; ++j) {
        lcos += pl[j];
        rc += pr[j];
      }
      coef[i] = gscale * gather_h_coef(rc, inv_n, alpha);
    } else {
      if (need_grad)
        for (int64_t k = 0; k < K; ++k) zr[k] = gscale * ce_grad_coef(e[k] * inv_s, k == label, alpha);
      const acc_t* wy = W + label * d;
      acc_t* ur = u + i * d;
      for (int64_t j = 0; j < d; ++j) ur[j] = mroute_u(hr[j], inv_n, wy[j]);
    }
    loss[i] = row_loss(lse, z_y, lcos, alpha);
  }
}

// Loss and G (in place of the logits) of the rows of one block at alpha = 0: cross entropy alone, without the
// cosine term's norms, S row or u, which alpha = 0 would weigh by zero.
template <typename acc_t>
void ce_block_epilogue(acc_t* z,          // [nr, K] logits in, G out
                       const int64_t* y,  // [nr]
                       int64_t nr, int64_t K, int64_t ignore_index, bool need_grad,
                       acc_t gscale,      // gradient scale (1/n_valid for mean)
                       acc_t* e,          // [K] scratch
                       acc_t* loss) {     // [nr]
  for (int64_t i = 0; i < nr; ++i) {
    acc_t* zr = z + i * K;
    const int64_t label = y[i];
    if (label == ignore_index) {
      loss[i] = 0;
      if (need_grad) std::fill(zr, zr + K, acc_t(0));
      continue;
    }
    acc_t s;
    const acc_t lse = row_lse(zr, e, K, &s);
    const acc_t z_y = zr[label];
    if (need_grad) {
      const acc_t inv_s = acc_t(1) / s;
      for (int64_t k = 0; k < K; ++k) zr[k] = gscale * ce_grad_coef(e[k] * inv_s, k == label, acc_t(0));
    }
    // an Inf or NaN in h makes z_y non-finite and the row's cosines undefined: NaN, as the full loss gives
    loss[i] = std::isfinite(z_y) ? row_loss(lse, z_y, acc_t(0), acc_t(0)) : acc_t(NAN);
  }
}

// Rows per block: up to kCpuBlockBytes of logits; blocks of equal size, within a row.
inline int64_t block_rows(int64_t B, int64_t K, int64_t elem_bytes) {
  const int64_t rows = rows_per_chunk(B, K, elem_bytes, kCpuBlockBytes);
  const int64_t nblocks = (B + rows - 1) / rows;
  return (B + nblocks - 1) / nblocks;
}

// Rows [0, nr) of a block after its second GEMM: the M route's d x d term (u, v = u M: loss and gradient), or
// the gather route's radial correction dh -= coef h.
template <typename acc_t>
void block_finish(const acc_t* h,       // [nr, d]
                  const acc_t* u,       // [nr, d] M route, else nullptr
                  const acc_t* v,       // [nr, d] M route: u M
                  const int64_t* y,     // [nr]
                  const acc_t* inv_n,   // [nr]
                  const acc_t* coef,    // [nr] gather route
                  int64_t nr, int64_t d, acc_t alpha, int64_t ignore_index, acc_t gscale,
                  acc_t* loss,          // [nr]
                  acc_t* g) {           // [nr, d] gradient rows, or nullptr
  for (int64_t i = 0; i < nr; ++i) {
    const acc_t* hr = h + i * d;
    if (u) {
      if (y[i] == ignore_index) continue;
      const acc_t *ur = u + i * d, *vr = v + i * d;
      const acc_t lcos = dot(ur, vr, d);
      const acc_t hv = dot(hr, vr, d) * inv_n[i];
      loss[i] += alpha * lcos;
      if (g) {
        acc_t* gr = g + i * d;
        for (int64_t j = 0; j < d; ++j) gr[j] += gscale * mroute_grad(vr[j], hr[j], inv_n[i], hv, alpha);
      }
    } else if (coef[i] != 0) {
      acc_t* gr = g + i * d;
      for (int64_t j = 0; j < d; ++j) gr[j] -= coef[i] * hr[j];
    }
  }
}

template <typename acc_t>
void fused_loss_cpu_impl(const at::Tensor& h,       // [B, d]
                         const at::Tensor& W,       // [K, d]
                         const at::Tensor& target,  // [B]
                         const acc_t* inv_wn,       // [K] gather route, else nullptr
                         const at::Tensor& S,       // [K, K] gather route, or undefined
                         const at::Tensor& M,       // [d, d] M route, or undefined (neither: CE only, alpha = 0)
                         acc_t alpha, int64_t ignore_index, bool need_grad, acc_t gscale,
                         at::Tensor& loss,          // [B]
                         at::Tensor& grad) {        // [B, d] or empty
  const int64_t B = h.size(0), d = h.size(1), K = W.size(0);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // below kCpuParallelMacs waking threads costs more than it saves
  const bool threaded = nthreads > 1 && B * K * d >= kCpuParallelMacs;
  const int64_t rows = block_rows(B, K, sizeof(acc_t));
  const int64_t nblocks = (B + rows - 1) / rows;
  const bool mroute = M.defined(), ce_only = !mroute && !S.defined();
  const acc_t* Sp = S.defined() ? S.data_ptr<acc_t>() : nullptr;
  const acc_t* Wp = W.data_ptr<acc_t>();
  const int64_t* yp = target.data_ptr<int64_t>();
  acc_t* lossp = loss.data_ptr<acc_t>();
  const at::Tensor Wt = W.t();
  at::Tensor zbuf = at::empty({rows, K}, h.options());  // [rows, K] logits, then G
  at::Tensor ubuf = mroute ? at::empty({rows, d}, h.options()) : at::Tensor();  // [rows, d] M route: u
  at::Tensor vbuf = mroute ? at::empty({rows, d}, h.options()) : at::Tensor();  // [rows, d] M route: u M
  std::vector<acc_t> coef(rows), inv_n(rows);
  const int64_t epi_chunk = std::max<int64_t>(1, kCpuChunkElems / K);
  const int64_t fin_chunk = std::max<int64_t>(1, kCpuChunkElems / std::max<int64_t>(1, d));  // d may be 0
  // a whole-tensor block needs no narrow (one ATen call fewer each)
  auto rows_of = [](const at::Tensor& t, int64_t r0, int64_t nr) {
    return r0 == 0 && nr == t.size(0) ? t : t.narrow(0, r0, nr);
  };

  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t r0 = blk * rows, nr = std::min(rows, B - r0);
    const at::Tensor hb = rows_of(h, r0, nr);
    at::Tensor z = rows_of(zbuf, 0, nr);
    at::mm_out(z, hb, Wt);
    const acc_t* hp = hb.data_ptr<acc_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    acc_t* up = mroute ? ubuf.data_ptr<acc_t>() : nullptr;
    // softmax, CE and the cosine term of each row; G over its logits
    dynamic_chunks(nr, epi_chunk, threaded, [&] { return std::vector<acc_t>(K); },
                   [&](int64_t i0, int64_t i1, std::vector<acc_t>& e) {
                     if (ce_only) {
                       ce_block_epilogue<acc_t>(zp + i0 * K, yp + r0 + i0, i1 - i0, K, ignore_index, need_grad,
                                                gscale, e.data(), lossp + r0 + i0);
                       return;
                     }
                     block_epilogue<acc_t>(zp + i0 * K, hp + i0 * d, yp + r0 + i0, inv_wn, Sp, Wp, i1 - i0, K, d,
                                           alpha, ignore_index, need_grad, gscale, e.data(), lossp + r0 + i0,
                                           coef.data() + i0, inv_n.data() + i0, up ? up + i0 * d : nullptr);
                   });
    at::Tensor gb;
    if (need_grad) {
      gb = rows_of(grad, r0, nr);
      at::mm_out(gb, z, W);
    }
    // CE only, or the gather route without a gradient: the block is complete after the epilogue
    if (ce_only || (!mroute && !need_grad)) continue;
    const acc_t* vp = nullptr;
    if (mroute) {
      at::Tensor v = rows_of(vbuf, 0, nr);
      at::mm_out(v, rows_of(ubuf, 0, nr), M);
      vp = v.data_ptr<acc_t>();
    }
    acc_t* gp = need_grad ? gb.data_ptr<acc_t>() : nullptr;
    dynamic_chunks(nr, fin_chunk, threaded, [] { return 0; }, [&](int64_t i0, int64_t i1, int) {
      block_finish<acc_t>(hp + i0 * d, up ? up + i0 * d : nullptr, vp ? vp + i0 * d : nullptr, yp + r0 + i0,
                          inv_n.data() + i0, coef.data() + i0, i1 - i0, d, alpha, ignore_index, gscale,
                          lossp + r0 + i0, gp ? gp + i0 * d : nullptr);
    });
  }
}

// 1/||w_k|| for every class row (rows below kEps count as kEps).
template <typename acc_t>
void inverse_row_norms(const acc_t* W, int64_t K, int64_t d, acc_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    out[k] = acc_t(1) / std::max<acc_t>(hf_sqrt(dot(W + k * d, W + k * d, d)), acc_t(kEps));
  }
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& features,                  // [B, d]
                                                  const at::Tensor& weight,                    // [K, d]
                                                  const at::Tensor& target,                    // [B]
                                                  const c10::optional<at::Tensor>& similarity, // [K, K]
                                                  const c10::optional<at::Tensor>& gram,       // [d, d]
                                                  double alpha, int64_t ignore_index, int64_t reduction,
                                                  bool need_grad) {
  check_fused_loss_inputs(features, weight, target, similarity, gram, alpha, reduction);
  if (gram.has_value()) check_unit_rows_for_gram(weight);
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  // tensors already in the wanted dtype and layout are used as they are (no ATen call per input)
  auto as = [](const at::Tensor& t, at::ScalarType dt) {
    return t.scalar_type() == dt ? t.contiguous() : t.to(dt).contiguous();
  };
  const at::Tensor y = as(target, at::kLong);
  const int64_t* yp = y.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < B; ++i) {  // label range on the host, before any kernel indexes with it
    if (yp[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(yp[i] >= 0 && yp[i] < K, bad_label_message(i, yp[i], K, ignore_index));
    ++n_valid;
  }
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor h = as(features, acc);
  const at::Tensor W = as(weight, acc);
  at::Tensor rows = at::empty({B}, h.options());
  at::Tensor grad = need_grad ? at::empty({B, d}, h.options()) : at::empty({0}, features.options());
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(acc, "haframe_fused_loss_cpu", [&] {
    const scalar_t gscale = reduction == kMean ? (n_valid > 0 ? scalar_t(1) / n_valid : scalar_t(0)) : scalar_t(1);
    if (B > 0) {
      // alpha = 0 is cross entropy alone: S, M and the row norms are never read (ce_only, chosen once per call)
      const bool ce_only = alpha == 0.0;
      const at::Tensor S = similarity.has_value() && !ce_only ? similarity->contiguous() : at::Tensor();
      const at::Tensor M = gram.has_value() && !ce_only ? gram->contiguous() : at::Tensor();
      std::vector<scalar_t> inv_wn;  // the M route takes unit rows and needs no norms
      if (S.defined()) {
        inv_wn.resize(K);
        inverse_row_norms<scalar_t>(W.data_ptr<scalar_t>(), K, d, inv_wn.data());
      }
      fused_loss_cpu_impl<scalar_t>(h, W, y, inv_wn.empty() ? nullptr : inv_wn.data(), S, M,
                                    static_cast<scalar_t>(alpha), ignore_index, need_grad, gscale, rows, grad);
    }
    if (reduction == kNone) {
      loss = rows;
    } else {
      double total = 0;  // rows of ignored labels are 0
      const scalar_t* rp = rows.data_ptr<scalar_t>();
      for (int64_t i = 0; i < B; ++i) total += rp[i];
      if (reduction == kMean) total = n_valid > 0 ? total / n_valid : std::nan("");
      loss = at::scalar_tensor(total, h.options());
    }
  });
  if (need_grad && grad.scalar_type() != features.scalar_type()) grad = grad.to(features.scalar_type());
  return {loss, grad};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CPU, m) { m.impl("fused_loss", &haframe::fused_loss_cpu); }
