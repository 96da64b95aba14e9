// What the three CUDA host paths of the fused HAFrame loss share (fused_loss.cpp chooses one per call):
// the checked inputs, the outputs and work buffers, the epilogue choice, and the row-chunk loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <tuple>

#include "fused_loss_kernels.cuh"

namespace haframe {
namespace fused_cuda {

using Result = std::tuple<at::Tensor, at::Tensor>;  // (loss, grad) as the op returns them

// The op's inputs after check_fused_loss_inputs, contiguous, with the stream of the call.
struct Inputs {
  at::Tensor h;  // [B, d]
  at::Tensor W;  // [K, d]
  at::Tensor y;  // [B] int64
  at::Tensor S;  // [K, K] accumulation dtype (gather route), or undefined
  at::Tensor M;  // [d, d] accumulation dtype (M route), or undefined
  double alpha;
  int64_t ignore_index, reduction;
  bool need_grad;
  int64_t B, d, K;
  at::TensorOptions acc_opts;  // the accumulation dtype (double for double, float otherwise)
  cudaStream_t stream;
  bool mroute() const { return M.defined(); }
};

// The outputs and the work buffers of one call; every one NaN-filled when HAFRAME_DEBUG_POISON=1.
struct Buffers {
  at::Tensor rows;            // [B] accumulation dtype: the loss of each row
  at::Tensor grad;            // [B, d], or [0] without need_grad
  int64_t R = 0;              // rows per chunk (0 when B = 0: no work buffers)
  at::Tensor z, coef, inv_n;  // [R, K] logits then G, [R], [R]
  at::Tensor u, v;            // [R, d] accumulation dtype, M route only
};

// How the row epilogue runs: its row norms of W, which kernel, and the gradient scale of the reduction.
template <typename acc_t>
struct Epilogue {
  at::Tensor inv_wn;                 // [K] 1 / ||w_k|| (gather route), undefined on the M route
  bool vec = false;                  // launch_row_epilogue_vec (the tuned kernel) instead of the generic one
  cuda::GradScale<acc_t> gscale{acc_t(1), nullptr};
  at::Tensor gscale_dev;             // [1] keeps gscale.device alive under capture
};

bool poison_enabled();
void poison(std::initializer_list<at::Tensor> ts);

// The label counters of launch_label_check as a device pointer into stats ([2] int64).
unsigned long long* counters(const at::Tensor& stats);

// Raises the op's error for the first bad label when first_bad (B - its row) is not 0.
void raise_if_bad_label(const Inputs& in, int64_t first_bad);

// gram stands for unit rows: refuses other rows (reads W back, so never under capture).
void check_gram_rows(const Inputs& in);

Buffers make_buffers(const Inputs& in);

// The op's outputs from the row losses with n_valid counted on the host (mean: 0/0 = NaN when every row is ignored).
Result finish_on_host(const Buffers& buf, int64_t reduction, int64_t n_valid);

// The gradient scale of the reduction from the host count of valid rows.
template <typename acc_t>
cuda::GradScale<acc_t> host_grad_scale(int64_t reduction, int64_t n_valid);

// Row norms by ATen, the generic epilogue kernels.
template <typename scalar_t>
Epilogue<at::opmath_type<scalar_t>> default_epilogue(const Inputs& in);

// Row norms by one kernel, the vector epilogue wherever vec_epilogue_supported accepts the buffers.
template <typename scalar_t>
Epilogue<at::opmath_type<scalar_t>> tuned_epilogue(const Inputs& in, const Buffers& buf);

// The logits GEMM, the epilogue and the backward GEMM over row chunks of R rows (B > 0).
template <typename scalar_t>
void run_chunks(const Inputs& in, Buffers& buf, const Epilogue<at::opmath_type<scalar_t>>& e);

// The three paths: labels checked on the host after a copy back (default), the same with the counters
// copied straight to host memory and the tuned kernels (tuned), or nothing read on the host and a bad label
// made a NaN row (capture: inside CUDA-graph capture, with the kernels of tuned_kernels' choice).
template <typename scalar_t>
Result fused_loss_default(const Inputs& in);
template <typename scalar_t>
Result fused_loss_tuned(const Inputs& in);
template <typename scalar_t>
Result fused_loss_capture(const Inputs& in, bool tuned_kernels);

// Explicit instantiation of a template over the op's dtypes (macro(T) for each).
#define HAFRAME_FUSED_CUDA_DTYPES(macro) macro(float) macro(double) macro(at::Half) macro(at::BFloat16)

// The CUDA type of an ATen scalar type (the kernels take __half / __nv_bfloat16).
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

}  // namespace fused_cuda
}  // namespace haframe
