// The CUDA-graph capture path of the fused HAFrame loss: nothing may wait for the device, so the label
// counters stay there (the gradient scale and the mean read them on the device), a bad label turns its
// row's loss into NaN inside the kernels instead of raising, and gram's unit rows are not checked.
#include <c10/cuda/CUDAException.h>

#include "../fused_loss_checks.h"
#include "fused_loss_host.h"

namespace haframe {
namespace fused_cuda {

template <typename scalar_t>
Result fused_loss_capture(const Inputs& in, bool tuned_kernels) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor stats = at::empty({2}, in.y.options());
  cuda::launch_label_check(in.y.data_ptr<int64_t>(), in.B, in.K, in.ignore_index, counters(stats), in.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Buffers buf = make_buffers(in);
  if (in.B > 0) {
    auto e = tuned_kernels ? tuned_epilogue<scalar_t>(in, buf) : default_epilogue<scalar_t>(in);
    const at::Tensor scale_dev = at::empty({1}, in.acc_opts);  // 1/n_valid from the device counters
    cuda::launch_grad_scale<acc_t>(counters(stats), in.reduction == kMean, scale_dev.data_ptr<acc_t>(), in.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    e.gscale = cuda::GradScale<acc_t>{in.reduction == kMean ? acc_t(0) : acc_t(1), scale_dev.data_ptr<acc_t>()};
    e.gscale_dev = scale_dev;
    run_chunks<scalar_t>(in, buf, e);
  }
  if (in.reduction == kNone) return {buf.rows, buf.grad};
  at::Tensor total = buf.rows.sum();
  if (in.reduction == kMean) total.div_(stats.select(0, 0).to(total.scalar_type()));  // 0/0 = NaN: all ignored
  return {total, buf.grad};
}

#define HAFRAME_INSTANTIATE(T) template Result fused_loss_capture<T>(const Inputs&, bool);
HAFRAME_FUSED_CUDA_DTYPES(HAFRAME_INSTANTIATE)
#undef HAFRAME_INSTANTIATE

}  // namespace fused_cuda
}  // namespace haframe
