// Launchers of the CUDA kernels of the fused HAFrame loss. Pure CUDA (no ATen): this header and
// fused_loss_kernels.cu compile with nvcc alone. scalar_t in {float, double, __half, __nv_bfloat16};
// acc_t is double for double and float otherwise. Pointers are device pointers, row-major, contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace haframe {
namespace cuda {

// The gradient scale of the reduction (1/n_valid for mean, else 1): a host value, or, under CUDA-graph
// capture where the count of valid rows stays on the device, a device scalar that takes its place.
template <typename T>
struct GradScale {
  T value;
  const T* device;  // nullptr: use value
};

// Per row: norm, logsumexp, CE and (gather route, S != nullptr) the cosine term; writes the logit-space
// gradient G over the logits when need_grad; M route (u != nullptr): u = h inv_n - w_y. A label outside
// [0, K) that is not ignore_index (possible only under CUDA-graph capture, where the host does not see
// the labels) makes that row's loss NaN and its gradient 0; nothing is read out of bounds.
template <typename scalar_t, typename acc_t>
void launch_row_epilogue(scalar_t* z,            // [R, K] logits in, G out
                         const scalar_t* h,      // [R, d]
                         const scalar_t* W,      // [K, d]
                         const acc_t* inv_wn,    // [K]
                         const acc_t* S,         // [K, K] (row y: label y's target), or nullptr (M route)
                         const int64_t* y,       // [R]
                         int64_t R, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index, bool need_grad,
                         GradScale<acc_t> gscale,
                         acc_t* loss,            // [R]
                         acc_t* coef,            // [R] gather route: dh -= coef h
                         acc_t* inv_n,           // [R]
                         acc_t* u,               // [R, d] or nullptr
                         cudaStream_t stream);

// M route: adds alpha u.v to the loss and writes dh_cos (into corr, when not nullptr).
template <typename scalar_t, typename acc_t>
void launch_mroute_finish(const scalar_t* h,     // [R, d]
                          const acc_t* u,        // [R, d]
                          const acc_t* v,        // [R, d] = u M
                          const acc_t* inv_n,    // [R]
                          int64_t R, int64_t d, acc_t alpha, GradScale<acc_t> gscale,
                          acc_t* loss,           // [R]
                          scalar_t* corr,        // [R, d] or nullptr
                          cudaStream_t stream);

// Gather route: corr = -coef h (the term the backward GEMM adds to).
template <typename scalar_t, typename acc_t>
void launch_gather_correction(const scalar_t* h,  // [R, d]
                              const acc_t* coef,  // [R]
                              int64_t R, int64_t d,
                              scalar_t* corr,     // [R, d]
                              cudaStream_t stream);

// The tuned epilogue: launch_row_epilogue's work with 16-byte loads, the row kept in registers between
// its two passes when K <= 16 * 256, and the gather-route correction corr = -coef h written here
// (corr != nullptr; launch_gather_correction is then not needed). Only for shapes and pointers that
// vec_epilogue_supported accepts.
template <typename scalar_t, typename acc_t>
void launch_row_epilogue_vec(scalar_t* z,          // [R, K] logits in, G out
                             const scalar_t* h,    // [R, d]
                             const scalar_t* W,    // [K, d]
                             const acc_t* inv_wn,  // [K] (gather route)
                             const acc_t* S,       // [K, K] (row y: label y's target), or nullptr (M route)
                             const int64_t* y,     // [R]
                             int64_t R, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index, bool need_grad,
                             GradScale<acc_t> gscale,
                             acc_t* loss,          // [R]
                             acc_t* inv_n,         // [R]
                             acc_t* u,             // [R, d] or nullptr
                             scalar_t* corr,       // [R, d] or nullptr
                             cudaStream_t stream);

// Whether launch_row_epilogue_vec applies: K and d multiples of 16 / elem_size, every pointer 16-byte aligned.
bool vec_epilogue_supported(int64_t K, int64_t d, int elem_size, const void* const* ptrs, int n_ptrs);

// out[k] = 1 / max(||W[k]||, eps), accumulated in acc_t (one launch, no cast copy of W).
template <typename scalar_t, typename acc_t>
void launch_row_inv_norm(const scalar_t* W,  // [K, d]
                         int64_t K, int64_t d,
                         acc_t* out,         // [K]
                         cudaStream_t stream);

// launch_label_check, then its two counters copied to host_stats (host memory) and the stream synchronised.
cudaError_t label_check_to_host(const int64_t* y, int64_t B, int64_t K, int64_t ignore_index,
                                unsigned long long* stats,       // [2] device
                                unsigned long long* host_stats,  // [2] host
                                cudaStream_t stream);

// The device scalar of GradScale: 1 / stats[0] for mean (0 when no row counts), else 1.
template <typename acc_t>
void launch_grad_scale(const unsigned long long* stats,  // [2] from launch_label_check
                       bool mean,
                       acc_t* out,                      // [1]
                       cudaStream_t stream);

// Label range check: stats[0] = number of rows not equal to ignore_index, stats[1] = B - i for the
// first row i whose label is outside [0, K) and not ignore_index (0 when there is none).
void launch_label_check(const int64_t* y,               // [B]
                        int64_t B, int64_t K, int64_t ignore_index,
                        unsigned long long* stats,      // [2]
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace haframe
