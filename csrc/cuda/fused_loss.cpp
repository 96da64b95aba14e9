// CUDA entry of the fused HAFrame loss: checks the inputs, chooses the host path once per call (graph
// capture state, then HAFRAME_CUDA_TUNED), dispatches on the dtype once, and registers the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>

#include "../fused_loss_checks.h"
#include "fused_loss_host.h"

namespace haframe {
namespace {

enum class Path { kDefault, kTuned, kCapture };

// HAFRAME_CUDA_TUNED=1 selects the tuned kernels (vector epilogue with the correction folded in, one-kernel
// inverse norms, the label counters copied straight to host memory); off by default (its hardware status:
// bench/RESULTS.md). bench/gpu_check.sh runs the CUDA tests with it on and off.
bool tuned_path_enabled() {
  const char* v = std::getenv("HAFRAME_CUDA_TUNED");
  return v != nullptr && v[0] == '1';
}

// Inside CUDA-graph capture nothing may wait for the device: the capture path, whatever the switch says.
Path choose_path(cudaStream_t stream, bool tuned) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return Path::kCapture;
  return tuned ? Path::kTuned : Path::kDefault;
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
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const fused_cuda::Inputs in{features.contiguous(),
                              weight.contiguous(),
                              target.to(at::kLong).contiguous(),
                              similarity.has_value() ? similarity->contiguous() : at::Tensor(),
                              gram.has_value() ? gram->contiguous() : at::Tensor(),
                              alpha,
                              ignore_index,
                              reduction,
                              need_grad,
                              features.size(0),
                              features.size(1),
                              weight.size(0),
                              features.options().dtype(acc),
                              c10::cuda::getCurrentCUDAStream()};
  const bool tuned = tuned_path_enabled();
  const Path path = choose_path(in.stream, tuned);
  fused_cuda::Result out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "haframe_fused_loss_cuda", [&] {
    switch (path) {
      case Path::kCapture: out = fused_cuda::fused_loss_capture<scalar_t>(in, tuned); break;
      case Path::kTuned: out = fused_cuda::fused_loss_tuned<scalar_t>(in); break;
      case Path::kDefault: out = fused_cuda::fused_loss_default<scalar_t>(in); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, CUDA, m) { m.impl("fused_loss", &haframe::fused_loss_cuda); }
