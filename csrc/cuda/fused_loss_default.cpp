// The default CUDA path of the fused HAFrame loss: labels counted on the device and the two counters
// copied back (a bad label raises before any kernel reads it), row norms by ATen, the generic epilogue.
#include <c10/cuda/CUDAException.h>

#include "../fused_loss_checks.h"
#include "fused_loss_host.h"

namespace haframe {
namespace fused_cuda {

template <typename scalar_t>
Result fused_loss_default(const Inputs& in) {
  check_gram_rows(in);
  const at::Tensor stats = at::empty({2}, in.y.options());
  cuda::launch_label_check(in.y.data_ptr<int64_t>(), in.B, in.K, in.ignore_index, counters(stats), in.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor copied = stats.cpu();
  const int64_t n_valid = copied[0].item<int64_t>();
  raise_if_bad_label(in, copied[1].item<int64_t>());
  Buffers buf = make_buffers(in);
  if (in.B > 0) {
    auto e = default_epilogue<scalar_t>(in);
    e.gscale = host_grad_scale<at::opmath_type<scalar_t>>(in.reduction, n_valid);
    run_chunks<scalar_t>(in, buf, e);
  }
  return finish_on_host(buf, in.reduction, n_valid);
}

#define HAFRAME_INSTANTIATE(T) template Result fused_loss_default<T>(const Inputs&);
HAFRAME_FUSED_CUDA_DTYPES(HAFRAME_INSTANTIATE)
#undef HAFRAME_INSTANTIATE

}  // namespace fused_cuda
}  // namespace haframe
