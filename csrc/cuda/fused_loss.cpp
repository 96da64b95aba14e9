// CUDA host side of the fused HAFrame loss: cuBLAS GEMMs through ATen on row chunks (never B x K
// logits at once), the epilogue kernels of fused_loss_kernels.cu, and the CUDA registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

  // Label range on the host before any kernel indexes with it: one small kernel and one copy back.
  at::Tensor stats = at::empty({2}, y.options());
  cuda::launch_label_check(y.data_ptr<int64_t>(), B, K, ignore_index,
                           reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>()), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host_stats = stats.cpu();
  const int64_t n_valid = host_stats[0].item<int64_t>(), first_bad = host_stats[1].item<int64_t>();
  if (first_bad > 0) {
    const int64_t i = B - first_bad;
    TORCH_CHECK_VALUE(false, bad_label_message(i, y[i].item<int64_t>(), K, ignore_index));
  }

  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = features.options().dtype(acc);
  at::Tensor rows = at::zeros({B}, acc_opts);
  at::Tensor grad = need_grad ? at::empty({B, d}, features.options()) : at::empty({0}, features.options());
  if (B > 0) {
    const at::Tensor h = features.contiguous();
    const at::Tensor W = weight.contiguous();
    const at::Tensor inv_wn = at::linalg_vector_norm(W.to(acc), 2, {1}).clamp_min(kEps).reciprocal();
    const bool mroute = gram.has_value();
    const at::Tensor S = mroute ? at::Tensor() : similarity->contiguous();
    const at::Tensor M = mroute ? gram->contiguous() : at::Tensor();

    const int64_t R = rows_per_chunk(B, K, features.element_size(), kCudaChunkBytes);
    at::Tensor zbuf = at::empty({R, K}, features.options());
    at::Tensor coef = at::empty({R}, acc_opts), inv_n = at::empty({R}, acc_opts);
    at::Tensor ubuf = mroute ? at::empty({R, d}, acc_opts) : at::Tensor();
    at::Tensor vbuf = mroute ? at::empty({R, d}, acc_opts) : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "haframe_fused_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      using cuda_t = typename CudaType<scalar_t>::type;
      const acc_t a = static_cast<acc_t>(alpha);
      const acc_t gscale = reduction == kMean ? (n_valid > 0 ? acc_t(1) / n_valid : acc_t(0)) : acc_t(1);
      for (int64_t r0 = 0; r0 < B; r0 += R) {
        const int64_t nr = std::min(R, B - r0);
        const at::Tensor hb = h.narrow(0, r0, nr);
        at::Tensor z = zbuf.narrow(0, 0, nr);
        at::mm_out(z, hb, W.t());
        acc_t* lp = rows.data_ptr<acc_t>() + r0;
        cuda::launch_row_epilogue<cuda_t, acc_t>(
            cuda_ptr<scalar_t>(z), cuda_ptr<scalar_t>(hb), cuda_ptr<scalar_t>(W), inv_wn.data_ptr<acc_t>(),
            mroute ? nullptr : S.data_ptr<acc_t>(), y.data_ptr<int64_t>() + r0, nr, K, d, a, ignore_index, need_grad,
            gscale, lp, coef.data_ptr<acc_t>(), inv_n.data_ptr<acc_t>(), mroute ? ubuf.data_ptr<acc_t>() : nullptr,
            stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::Tensor gb = need_grad ? grad.narrow(0, r0, nr) : at::Tensor();
        if (mroute) {
          at::Tensor v = vbuf.narrow(0, 0, nr);
          at::mm_out(v, ubuf.narrow(0, 0, nr), M);
          cuda::launch_mroute_finish<cuda_t, acc_t>(cuda_ptr<scalar_t>(hb), ubuf.data_ptr<acc_t>(),
                                                    v.data_ptr<acc_t>(), inv_n.data_ptr<acc_t>(), nr, d, a, gscale,
                                                    lp, need_grad ? cuda_ptr<scalar_t>(gb) : nullptr, stream);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else if (need_grad) {
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
  if (reduction == kMean) total.div_(static_cast<double>(n_valid));  // 0/0 = NaN when every row is ignored
  return {total, grad};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CUDA, m) { m.impl("fused_loss", &haframe::fused_loss_cuda); }
