// Launcher of the CUDA epilogue of the hierarchical losses (HXE, soft labels, CE). Pure CUDA (no ATen): this
// header and hier_loss_kernels.cu compile with nvcc alone. acc_t in {float, double}; device pointers,
// row-major, contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace haframe {
namespace cuda {

// Per row (one block each): the segment logsumexps of its label path, the row loss, and (need_grad) the
// logit gradient times gscale * row_scale[r] written over the logits (csrc/hier_math.h).
template <typename acc_t>
void launch_hier_epilogue(acc_t* z,                // [R, K] logits in (label order), gradient out
                          const int64_t* order,    // [K] label at each depth-first position, or nullptr
                          const int64_t* start,    // [R, P] path ranges by depth (-1 past the label)
                          const int64_t* end,      // [R, P]
                          const double* value,     // [R, P] HXE weights / soft-label kernel values
                          int64_t R, int64_t K, int64_t P, int64_t kind, bool need_grad, acc_t gscale,
                          const acc_t* row_scale,  // [R] or nullptr
                          acc_t* loss,             // [R]
                          acc_t* work,             // [R, 4 P] scratch
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace haframe
