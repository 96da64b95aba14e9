// The tuned CUDA path of the fused HAFrame loss (HAFRAME_CUDA_TUNED=1): the label counters copied straight
// to host memory, row norms by one kernel, the vector epilogue with the gather correction folded in.
#include <c10/cuda/CUDAException.h>

#include "../fused_loss_checks.h"
#include "fused_loss_host.h"

namespace haframe {
namespace fused_cuda {

template <typename scalar_t>
Result fused_loss_tuned(const Inputs& in) {
  check_gram_rows(in);
  const at::Tensor stats = at::empty({2}, in.y.options());
  unsigned long long host_stats[2] = {0, 0};
  C10_CUDA_CHECK(cuda::label_check_to_host(in.y.data_ptr<int64_t>(), in.B, in.K, in.ignore_index, counters(stats),
                                           host_stats, in.stream));
  const int64_t n_valid = static_cast<int64_t>(host_stats[0]);
  raise_if_bad_label(in, static_cast<int64_t>(host_stats[1]));
  Buffers buf = make_buffers(in);
  if (in.B > 0) {
    auto e = tuned_epilogue<scalar_t>(in, buf);
    e.gscale = host_grad_scale<at::opmath_type<scalar_t>>(in.reduction, n_valid);
    run_chunks<scalar_t>(in, buf, e);
  }
  return finish_on_host(buf, in.reduction, n_valid);
}

#define HAFRAME_INSTANTIATE(T) template Result fused_loss_tuned<T>(const Inputs&);
HAFRAME_FUSED_CUDA_DTYPES(HAFRAME_INSTANTIATE)
#undef HAFRAME_INSTANTIATE

}  // namespace fused_cuda
}  // namespace haframe
