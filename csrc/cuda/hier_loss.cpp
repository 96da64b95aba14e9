// CUDA host side of the hierarchical losses: cuBLAS GEMMs through ATen on row chunks (never B x K logits at
// once: logits, d features, d weight), the epilogue kernel of hier_loss_kernels.cu, and the CUDA registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../hier_loss_checks.h"
#include "hier_loss_kernels.cuh"

namespace haframe {
namespace {

constexpr int64_t kHierCudaChunkBytes = int64_t(64) << 20;  // logits held at once

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hier_loss_cuda(
    const at::Tensor& features,                  // [B, d]
    const at::Tensor& weight,                    // [K, d]
    const c10::optional<at::Tensor>& bias,       // [K]
    const c10::optional<at::Tensor>& order,      // [K]
    const at::Tensor& path_start,                // [B, P]
    const at::Tensor& path_end,                  // [B, P]
    const at::Tensor& path_value,                // [B, P]
    int64_t kind,
    const c10::optional<at::Tensor>& row_scale,  // [B]
    int64_t reduction, bool need_grad, bool need_weight_grad) {
  check_hier_loss_inputs(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction);
  const c10::cuda::CUDAGuard guard(features.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0), P = path_start.size(1);
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor h = features.to(acc).contiguous();
  const at::Tensor W = weight.to(acc).contiguous();
  const at::Tensor bb = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor ord = order.has_value() ? order->contiguous() : at::Tensor();
  const at::Tensor ps = path_start.contiguous(), pe = path_end.contiguous(), pv = path_value.contiguous();
  const at::Tensor rs = row_scale.has_value() ? row_scale->to(acc).contiguous() : at::Tensor();
  at::Tensor rows = at::empty({B}, h.options());
  at::Tensor gh = need_grad ? at::empty({B, d}, h.options()) : at::empty({0}, h.options());
  at::Tensor gW = need_weight_grad ? at::zeros({K, d}, h.options()) : at::empty({0}, h.options());
  at::Tensor gb = need_weight_grad ? at::zeros({K}, h.options()) : at::empty({0}, h.options());
  if (B > 0) {
    const int64_t cap = rows_per_chunk(B, K, h.element_size(), kHierCudaChunkBytes);
    const int64_t nchunks = (B + cap - 1) / cap;
    const int64_t chunk = (B + nchunks - 1) / nchunks;
    at::Tensor zbuf = at::empty({chunk, K}, h.options());
    at::Tensor work = at::empty({chunk, 4 * P}, h.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "haframe_hier_loss_cuda", [&] {
      const scalar_t gscale = reduction == kMean ? scalar_t(1) / B : scalar_t(1);
      for (int64_t r0 = 0; r0 < B; r0 += chunk) {
        const int64_t nr = std::min(chunk, B - r0);
        const at::Tensor hc = h.narrow(0, r0, nr);
        at::Tensor z = zbuf.narrow(0, 0, nr);
        if (bb.defined()) at::addmm_out(z, bb, hc, W.t());
        else at::mm_out(z, hc, W.t());
        cuda::launch_hier_epilogue<scalar_t>(
            z.data_ptr<scalar_t>(), ord.defined() ? ord.data_ptr<int64_t>() : nullptr,
            ps.data_ptr<int64_t>() + r0 * P, pe.data_ptr<int64_t>() + r0 * P, pv.data_ptr<double>() + r0 * P, nr, K,
            P, kind, need_grad || need_weight_grad, gscale, rs.defined() ? rs.data_ptr<scalar_t>() + r0 : nullptr,
            rows.data_ptr<scalar_t>() + r0, work.data_ptr<scalar_t>(), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (need_grad) {
          at::Tensor out = gh.narrow(0, r0, nr);
          at::mm_out(out, z, W);
        }
        if (need_weight_grad) {
          gW.addmm_(z.t(), hc);
          gb.add_(z.sum(0));
        }
      }
    });
  }
  at::Tensor loss;
  if (reduction == kNone) loss = rows;
  else if (reduction == kSum) loss = rows.to(at::kDouble).sum().to(acc);
  else loss = B > 0 ? (rows.to(at::kDouble).sum() / B).to(acc) : at::full({}, NAN, h.options());
  if (need_grad) gh = gh.to(features.scalar_type());
  if (need_weight_grad) {
    gW = gW.to(weight.scalar_type());
    gb = gb.to(weight.scalar_type());
  }
  return {loss, gh, gW, gb};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CUDA, m) { m.impl("hier_loss", &haframe::hier_loss_cuda); }
