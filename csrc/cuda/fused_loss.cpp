// CUDA host side of the fused HAFrame loss: cuBLAS GEMMs through ATen on row chunks (never B x K
// logits at once), the epilogue kernels of fused_loss_kernels.cu, and the CUDA registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../fused_loss_checks.h"
#include "../haframe_math.h"
#include "fused_loss_kernels.cuh"

namespace haframe {
namespace {

constexpr int64_t kCudaChunkBytes = int64_t(64) << 20;  // logits held at once

// HAFRAME_CUDA_TUNED=1 selects the tuned path (vector epilogue with the correction folded in, one-kernel
// inverse norms, the label counters copied straight to host memory); off by default (its hardware status:
// bench/RESULTS.md). bench/gpu_check.sh runs the CUDA tests with it on and off.
bool tuned_path_enabled() {
  const char* v = std::getenv("HAFRAME_CUDA_TUNED");
  return v != nullptr && v[0] == '1';
}

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

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
typename CudaType<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cuda(const at::Tensor& features,                  // [B, d]
                                                   const at::Tensor& weight,                    // [K, d]
                                                   const at::Tensor& target,                    // [B]
                                                   const c10::optional<at::Tensor>& similarity, // [K, K]
                                                   const c10::optional<at::Tensor>& gram,       // [d, d]
                                                   double alpha, int64_t ignore_index, int64_t reduction,
                                                   bool need_grad) {
  check_fused_loss_inputs(features, weight, target, similarity, gram, alpha, reduction);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor y = target.to(at::kLong).contiguous();

  // Labels: counted and range-checked by one small kernel. Normally the two counters are copied back
  // and a bad label raises here, before any kernel indexes with it. Under CUDA-graph capture nothing may
  // wait for the device: the counters stay there (the gradient scale and the mean read them on the
  // device) and a bad label turns its row's loss into NaN inside the kernels instead.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  const bool tuned = tuned_path_enabled();
  if (gram.has_value() && !capturing) check_unit_rows_for_gram(weight);  // needs a read-back: not under capture
  at::Tensor stats = at::empty({2}, y.options());
  unsigned long long host_stats[2] = {0, 0};
  auto* dev_stats = reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
  if (capturing) {
    cuda::launch_label_check(y.data_ptr<int64_t>(), B, K, ignore_index, dev_stats, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (tuned) {
    C10_CUDA_CHECK(cuda::label_check_to_host(y.data_ptr<int64_t>(), B, K, ignore_index, dev_stats, host_stats, stream));
  } else {
    cuda::launch_label_check(y.data_ptr<int64_t>(), B, K, ignore_index, dev_stats, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor copied = stats.cpu();
    host_stats[0] = static_cast<unsigned long long>(copied[0].item<int64_t>());
    host_stats[1] = static_cast<unsigned long long>(copied[1].item<int64_t>());
  }
  const int64_t n_valid = static_cast<int64_t>(host_stats[0]), first_bad = static_cast<int64_t>(host_stats[1]);
  if (first_bad > 0) {
    const int64_t i = B - first_bad;
    TORCH_CHECK_VALUE(false, bad_label_message(i, y[i].item<int64_t>(), K, ignore_index));
  }

  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = features.options().dtype(acc);
  at::Tensor rows = at::empty({B}, acc_opts);  // the epilogue writes every row
  at::Tensor grad = need_grad ? at::empty({B, d}, features.options()) : at::empty({0}, features.options());
  if (B > 0) {
    const at::Tensor h = features.contiguous();
    const at::Tensor W = weight.contiguous();
    const bool mroute = gram.has_value();
    // 1/||w_k|| enters only the gather route's cosines (the M route's rows are unit by contract)
    at::Tensor inv_wn;
    if (!mroute && !tuned) inv_wn = at::linalg_vector_norm(W.to(acc), 2, {1}).clamp_min(kEps).reciprocal();
    if (!mroute && tuned) inv_wn = at::empty({K}, acc_opts);
    const at::Tensor S = mroute ? at::Tensor() : similarity->contiguous();
    const at::Tensor M = mroute ? gram->contiguous() : at::Tensor();

    const int64_t R = rows_per_chunk(B, K, features.element_size(), kCudaChunkBytes);
    at::Tensor zbuf = at::empty({R, K}, features.options());
    at::Tensor coef = at::empty({R}, acc_opts), inv_n = at::empty({R}, acc_opts);
    at::Tensor ubuf = mroute ? at::empty({R, d}, acc_opts) : at::Tensor();
    at::Tensor vbuf = mroute ? at::empty({R, d}, acc_opts) : at::Tensor();
    if (poison_enabled()) poison({rows, grad, zbuf, coef, inv_n, ubuf, vbuf, tuned ? inv_wn : at::Tensor()});

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "haframe_fused_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using cuda_t = typename CudaType<scalar_t>::type;
      const acc_t a = static_cast<acc_t>(alpha);
      cuda::GradScale<acc_t> gscale{
          reduction == kMean ? (n_valid > 0 ? acc_t(1) / n_valid : acc_t(0)) : acc_t(1), nullptr};
      at::Tensor gscale_dev;
      if (capturing) {  // 1/n_valid from the device counters
        gscale_dev = at::empty({1}, acc_opts);
        cuda::launch_grad_scale<acc_t>(dev_stats, reduction == kMean, gscale_dev.data_ptr<acc_t>(), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gscale.device = gscale_dev.data_ptr<acc_t>();
      }
      acc_t* iw = mroute ? nullptr : inv_wn.data_ptr<acc_t>();
      if (tuned && !mroute) {
        cuda::launch_row_inv_norm<cuda_t, acc_t>(cuda_ptr<scalar_t>(W), K, d, iw, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // the vector epilogue needs K, d multiples of 16 bytes and aligned rows (every chunk starts at row
      // r0 of h and grad, aligned when d is a multiple of the vector width)
      const void* ptrs[] = {zbuf.data_ptr(), h.data_ptr(), W.data_ptr(), mroute ? nullptr : S.data_ptr(), iw,
                            ubuf.defined() ? ubuf.data_ptr() : nullptr, need_grad ? grad.data_ptr() : nullptr};
      const bool vec = tuned && cuda::vec_epilogue_supported(K, d, static_cast<int>(sizeof(scalar_t)), ptrs, 7);
      for (int64_t r0 = 0; r0 < B; r0 += R) {
        const int64_t nr = std::min(R, B - r0);
        const at::Tensor hb = h.narrow(0, r0, nr);
        at::Tensor z = zbuf.narrow(0, 0, nr);
        at::mm_out(z, hb, W.t());
        acc_t* lp = rows.data_ptr<acc_t>() + r0;
        at::Tensor gb = need_grad ? grad.narrow(0, r0, nr) : at::Tensor();
        if (vec) {
          cuda::launch_row_epilogue_vec<cuda_t, acc_t>(
              cuda_ptr<scalar_t>(z), cuda_ptr<scalar_t>(hb), cuda_ptr<scalar_t>(W), iw,
              mroute ? nullptr : S.data_ptr<acc_t>(), y.data_ptr<int64_t>() + r0, nr, K, d, a, ignore_index,
              need_grad, gscale, lp, inv_n.data_ptr<acc_t>(), mroute ? ubuf.data_ptr<acc_t>() : nullptr,
              need_grad && !mroute ? cuda_ptr<scalar_t>(gb) : nullptr, stream);
        } else {
          cuda::launch_row_epilogue<cuda_t, acc_t>(
              cuda_ptr<scalar_t>(z), cuda_ptr<scalar_t>(hb), cuda_ptr<scalar_t>(W), iw,
              mroute ? nullptr : S.data_ptr<acc_t>(), y.data_ptr<int64_t>() + r0, nr, K, d, a, ignore_index,
              need_grad, gscale, lp, coef.data_ptr<acc_t>(), inv_n.data_ptr<acc_t>(),
              mroute ? ubuf.data_ptr<acc_t>() : nullptr, stream);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (mroute) {
          at::Tensor v = vbuf.narrow(0, 0, nr);
          at::mm_out(v, ubuf.narrow(0, 0, nr), M);
          cuda::launch_mroute_finish<cuda_t, acc_t>(cuda_ptr<scalar_t>(hb), ubuf.data_ptr<acc_t>(),
                                                    v.data_ptr<acc_t>(), inv_n.data_ptr<acc_t>(), nr, d, a, gscale,
                                                    lp, need_grad ? cuda_ptr<scalar_t>(gb) : nullptr, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else if (need_grad && !vec) {
          cuda::launch_gather_correction<cuda_t, acc_t>(cuda_ptr<scalar_t>(hb), coef.data_ptr<acc_t>(), nr, d,
                                                        cuda_ptr<scalar_t>(gb), stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (need_grad) gb.addmm_(z, W);  // grad = correction + G W: one GEMM with beta = 1
      }
    });
  }
  if (reduction == kNone) return {rows, grad};
  at::Tensor total = rows.sum();
  if (reduction == kMean) {  // 0/0 = NaN when every row is ignored
    if (capturing)
      total.div_(stats.select(0, 0).to(total.scalar_type()));
    else
      total.div_(static_cast<double>(n_valid));
  }
  return {total, grad};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CUDA, m) { m.impl("fused_loss", &haframe::fused_loss_cuda); }
