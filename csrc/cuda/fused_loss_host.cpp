// The steps the CUDA host paths of the fused HAFrame loss share: buffers, label errors, the epilogue
// choices and the row-chunk loop (cuBLAS GEMMs through ATen, never B x K logits at once).
#include "fused_loss_host.h"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "../fused_loss_checks.h"
#include "../haframe_math.h"

namespace haframe {
namespace fused_cuda {
namespace {

constexpr int64_t kCudaChunkBytes = int64_t(64) << 20;  // logits held at once

}  // namespace

// HAFRAME_DEBUG_POISON=1 fills every output and work buffer with NaN before the kernels run, so that a
// row or element a kernel fails to write shows up in the tests (the GPU check runs them with it on).
bool poison_enabled() {
  const char* v = std::getenv("HAFRAME_DEBUG_POISON");
  return v != nullptr && v[0] == '1';
}

void poison(std::initializer_list<at::Tensor> ts) {
  for (const at::Tensor& t : ts)
    if (t.defined() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

unsigned long long* counters(const at::Tensor& stats) {
  return reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
}

void raise_if_bad_label(const Inputs& in, int64_t first_bad) {
  if (first_bad <= 0) return;
  const int64_t i = in.B - first_bad;
  TORCH_CHECK_VALUE(false, bad_label_message(i, in.y[i].item<int64_t>(), in.K, in.ignore_index));
}

void check_gram_rows(const Inputs& in) {
  if (in.mroute()) check_unit_rows_for_gram(in.W);
}

Buffers make_buffers(const Inputs& in) {
  Buffers buf;
  const auto opts = in.h.options();
  buf.rows = at::empty({in.B}, in.acc_opts);  // the epilogue writes every row
  buf.grad = in.need_grad ? at::empty({in.B, in.d}, opts) : at::empty({0}, opts);
  if (in.B > 0) {
    buf.R = rows_per_chunk(in.B, in.K, in.h.element_size(), kCudaChunkBytes);
    buf.z = at::empty({buf.R, in.K}, opts);
    buf.coef = at::empty({buf.R}, in.acc_opts);
    buf.inv_n = at::empty({buf.R}, in.acc_opts);
    if (in.mroute()) {
      buf.u = at::empty({buf.R, in.d}, in.acc_opts);
      buf.v = at::empty({buf.R, in.d}, in.acc_opts);
    }
  }
  if (poison_enabled()) poison({buf.rows, buf.grad, buf.z, buf.coef, buf.inv_n, buf.u, buf.v});
  return buf;
}

Result finish_on_host(const Buffers& buf, int64_t reduction, int64_t n_valid) {
  if (reduction == kNone) return {buf.rows, buf.grad};
  at::Tensor total = buf.rows.sum();
  if (reduction == kMean) total.div_(static_cast<double>(n_valid));
  return {total, buf.grad};
}

template <typename acc_t>
cuda::GradScale<acc_t> host_grad_scale(int64_t reduction, int64_t n_valid) {
  if (reduction != kMean) return {acc_t(1), nullptr};
  return {n_valid > 0 ? acc_t(1) / n_valid : acc_t(0), nullptr};
}

template <typename scalar_t>
Epilogue<at::opmath_type<scalar_t>> default_epilogue(const Inputs& in) {
  Epilogue<at::opmath_type<scalar_t>> e;
  // 1/||w_k|| enters only the gather route's cosines (the M route's rows are unit by contract)
  if (!in.mroute())
    e.inv_wn = at::linalg_vector_norm(in.W.to(in.acc_opts.dtype()), 2, {1}).clamp_min(kEps).reciprocal();
  return e;
}

template <typename scalar_t>
Epilogue<at::opmath_type<scalar_t>> tuned_epilogue(const Inputs& in, const Buffers& buf) {
  using acc_t = at::opmath_type<scalar_t>;
  Epilogue<acc_t> e;
  if (!in.mroute()) {
    e.inv_wn = at::empty({in.K}, in.acc_opts);
    if (poison_enabled()) poison({e.inv_wn});
    cuda::launch_row_inv_norm<typename CudaType<scalar_t>::type, acc_t>(cuda_ptr<scalar_t>(in.W), in.K, in.d,
                                                                        e.inv_wn.template data_ptr<acc_t>(), in.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // the vector epilogue needs K, d multiples of 16 bytes and aligned rows (every chunk starts at row
  // r0 of h and grad, aligned when d is a multiple of the vector width)
  const void* ptrs[] = {buf.z.data_ptr(), in.h.data_ptr(), in.W.data_ptr(), in.mroute() ? nullptr : in.S.data_ptr(),
                        e.inv_wn.defined() ? e.inv_wn.data_ptr() : nullptr,
                        buf.u.defined() ? buf.u.data_ptr() : nullptr, in.need_grad ? buf.grad.data_ptr() : nullptr};
  e.vec = cuda::vec_epilogue_supported(in.K, in.d, static_cast<int>(sizeof(scalar_t)), ptrs, 7);
  return e;
}

namespace {

// One chunk's epilogue: loss rows, G over the logits in z, the correction dh_cos (or -coef h) in gb.
template <typename scalar_t>
void chunk_epilogue(const Inputs& in, Buffers& buf, const Epilogue<at::opmath_type<scalar_t>>& e, int64_t r0,
                    int64_t nr, const at::Tensor& z, const at::Tensor& hb, const at::Tensor& gb) {
  using acc_t = at::opmath_type<scalar_t>;
  using cuda_t = typename CudaType<scalar_t>::type;
  const bool mroute = in.mroute();
  const acc_t a = static_cast<acc_t>(in.alpha);
  const acc_t* iw = mroute ? nullptr : e.inv_wn.template data_ptr<acc_t>();
  const acc_t* S = mroute ? nullptr : in.S.data_ptr<acc_t>();
  acc_t* u = mroute ? buf.u.data_ptr<acc_t>() : nullptr;
  acc_t* lp = buf.rows.data_ptr<acc_t>() + r0;
  const int64_t* y = in.y.data_ptr<int64_t>() + r0;
  if (e.vec) {
    cuda_t* corr = in.need_grad && !mroute ? cuda_ptr<scalar_t>(gb) : nullptr;  // the correction folded in
    cuda::launch_row_epilogue_vec<cuda_t, acc_t>(
        cuda_ptr<scalar_t>(z), cuda_ptr<scalar_t>(hb), cuda_ptr<scalar_t>(in.W), iw, S, y, nr, in.K, in.d, a,
        in.ignore_index, in.need_grad, e.gscale, lp, buf.inv_n.data_ptr<acc_t>(), u, corr, in.stream);
  } else {
    cuda::launch_row_epilogue<cuda_t, acc_t>(
        cuda_ptr<scalar_t>(z), cuda_ptr<scalar_t>(hb), cuda_ptr<scalar_t>(in.W), iw, S, y, nr, in.K, in.d, a,
        in.ignore_index, in.need_grad, e.gscale, lp, buf.coef.data_ptr<acc_t>(), buf.inv_n.data_ptr<acc_t>(), u,
        in.stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mroute) {
    at::Tensor v = buf.v.narrow(0, 0, nr);
    at::mm_out(v, buf.u.narrow(0, 0, nr), in.M);
    cuda::launch_mroute_finish<cuda_t, acc_t>(cuda_ptr<scalar_t>(hb), u, v.data_ptr<acc_t>(),
                                              buf.inv_n.data_ptr<acc_t>(), nr, in.d, a, e.gscale, lp,
                                              in.need_grad ? cuda_ptr<scalar_t>(gb) : nullptr, in.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (in.need_grad && !e.vec) {
    cuda::launch_gather_correction<cuda_t, acc_t>(cuda_ptr<scalar_t>(hb), buf.coef.data_ptr<acc_t>(), nr, in.d,
                                                  cuda_ptr<scalar_t>(gb), in.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

template <typename scalar_t>
void run_chunks(const Inputs& in, Buffers& buf, const Epilogue<at::opmath_type<scalar_t>>& e) {
  for (int64_t r0 = 0; r0 < in.B; r0 += buf.R) {
    const int64_t nr = std::min(buf.R, in.B - r0);
    const at::Tensor hb = in.h.narrow(0, r0, nr);
    at::Tensor z = buf.z.narrow(0, 0, nr);
    at::mm_out(z, hb, in.W.t());
    at::Tensor gb = in.need_grad ? buf.grad.narrow(0, r0, nr) : at::Tensor();
    chunk_epilogue<scalar_t>(in, buf, e, r0, nr, z, hb, gb);
    if (in.need_grad) gb.addmm_(z, in.W);  // grad = correction + G W: one GEMM with beta = 1
  }
}

template cuda::GradScale<float> host_grad_scale<float>(int64_t, int64_t);
template cuda::GradScale<double> host_grad_scale<double>(int64_t, int64_t);
#define HAFRAME_INSTANTIATE(T)                                                                   \
  template Epilogue<at::opmath_type<T>> default_epilogue<T>(const Inputs&);                      \
  template Epilogue<at::opmath_type<T>> tuned_epilogue<T>(const Inputs&, const Buffers&);        \
  template void run_chunks<T>(const Inputs&, Buffers&, const Epilogue<at::opmath_type<T>>&);
HAFRAME_FUSED_CUDA_DTYPES(HAFRAME_INSTANTIATE)
#undef HAFRAME_INSTANTIATE

}  // namespace fused_cuda
}  // namespace haframe
