// C entry points to the CUDA kernel of csrc/cuda/hier_loss_kernels.cu run by the CPU emulator (include/emu.h),
// for tests/cuda_emu/hier_emulated.py. hier_kernels_emu.cpp is that .cu with each kernel<<<...>>>(...)
// launch rewritten to emu::launch(kernel, ...)(...) (see hier_emulated.py).
#include "hier_kernels_emu.cpp"

#include <string>

namespace hc = haframe::cuda;

extern "C" {

// The first rule a kernel broke since the last call ("" when none); the caller copies it at once.
const char* emu_pop_error() {
  static thread_local std::string msg;
  msg = emu::pop_error();
  return msg.c_str();
}

}  // extern "C"

#define EMU_HIER_WRAP(tag, acc_t)                                                                                  \
  extern "C" void emu_hier_epilogue_##tag(void* z, const int64_t* order, const int64_t* start, const int64_t* end, \
                                          const double* value, int64_t R, int64_t K, int64_t P, int64_t kind,      \
                                          int need_grad, double gscale, const void* row_scale, void* loss,         \
                                          void* work) {                                                            \
    hc::launch_hier_epilogue<acc_t>(static_cast<acc_t*>(z), order, start, end, value, R, K, P, kind,              \
                                    need_grad != 0, static_cast<acc_t>(gscale),                                    \
                                    static_cast<const acc_t*>(row_scale), static_cast<acc_t*>(loss),               \
                                    static_cast<acc_t*>(work), nullptr);                                           \
  }

EMU_HIER_WRAP(f32, float)
EMU_HIER_WRAP(f64, double)
