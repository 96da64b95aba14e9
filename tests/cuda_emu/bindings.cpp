// C entry points to the CUDA kernels of csrc/cuda/fused_loss_kernels.cu run by the CPU emulator
// (include/emu.h), for tests/cuda_emu/emulated.py. kernels_emu.cpp is that .cu with each
// kernel<<<...>>>(...) launch rewritten to emu::launch(kernel, ...)(...) (see emulated.py).
#include "kernels_emu.cpp"

namespace hc = haframe::cuda;

// GradScale from a host value and an optional device scalar (the capture path).
template <typename acc_t>
hc::GradScale<acc_t> scale_of(double value, const void* device) {
  return hc::GradScale<acc_t>{static_cast<acc_t>(value), static_cast<const acc_t*>(device)};
}

extern "C" {

// The first rule a kernel broke since the last call ("" when none); the caller copies it at once.
const char* emu_pop_error() {
  static thread_local std::string msg;
  msg = emu::pop_error();
  return msg.c_str();
}

int emu_vec_supported(int64_t K, int64_t d, int elem_size, const void* const* ptrs, int n) {
  return hc::vec_epilogue_supported(K, d, elem_size, ptrs, n) ? 1 : 0;
}

int emu_label_check_to_host(const int64_t* y, int64_t B, int64_t K, int64_t ignore_index, unsigned long long* stats,
                            unsigned long long* host_stats) {
  return static_cast<int>(hc::label_check_to_host(y, B, K, ignore_index, stats, host_stats, nullptr));
}

void emu_label_check(const int64_t* y, int64_t B, int64_t K, int64_t ignore_index, unsigned long long* stats) {
  hc::launch_label_check(y, B, K, ignore_index, stats, nullptr);
}

void emu_grad_scale_f32(const unsigned long long* stats, int mean, float* out) {
  hc::launch_grad_scale<float>(stats, mean != 0, out, nullptr);
}

void emu_grad_scale_f64(const unsigned long long* stats, int mean, double* out) {
  hc::launch_grad_scale<double>(stats, mean != 0, out, nullptr);
}

}  // extern "C"

#define EMU_WRAP(tag, scalar_t, acc_t)                                                                             \
  extern "C" void emu_row_epilogue_##tag(void* z, const void* h, const void* W, const void* inv_wn, const void* S, \
                                         const int64_t* y, int64_t R, int64_t K, int64_t d, double alpha,          \
                                         int64_t ignore_index, int need_grad, double gscale, const void* gdev,     \
                                         void* loss, void* coef, void* inv_n, void* u) {                           \
    hc::launch_row_epilogue<scalar_t, acc_t>(                                                                     \
        static_cast<scalar_t*>(z), static_cast<const scalar_t*>(h), static_cast<const scalar_t*>(W),              \
        static_cast<const acc_t*>(inv_wn), static_cast<const acc_t*>(S), y, R, K, d, static_cast<acc_t>(alpha),   \
        ignore_index, need_grad != 0, scale_of<acc_t>(gscale, gdev), static_cast<acc_t*>(loss),                   \
        static_cast<acc_t*>(coef), static_cast<acc_t*>(inv_n), static_cast<acc_t*>(u), nullptr);                  \
  }                                                                                                                \
  extern "C" void emu_row_epilogue_vec_##tag(void* z, const void* h, const void* W, const void* inv_wn,           \
                                             const void* S, const int64_t* y, int64_t R, int64_t K, int64_t d,     \
                                             double alpha, int64_t ignore_index, int need_grad, double gscale,     \
                                             const void* gdev, void* loss, void* inv_n, void* u, void* corr) {     \
    hc::launch_row_epilogue_vec<scalar_t, acc_t>(                                                                 \
        static_cast<scalar_t*>(z), static_cast<const scalar_t*>(h), static_cast<const scalar_t*>(W),              \
        static_cast<const acc_t*>(inv_wn), static_cast<const acc_t*>(S), y, R, K, d, static_cast<acc_t>(alpha),   \
        ignore_index, need_grad != 0, scale_of<acc_t>(gscale, gdev), static_cast<acc_t*>(loss),                   \
        static_cast<acc_t*>(inv_n), static_cast<acc_t*>(u), static_cast<scalar_t*>(corr), nullptr);               \
  }                                                                                                                \
  extern "C" void emu_mroute_finish_##tag(const void* h, const void* u, const void* v, const void* inv_n,         \
                                          int64_t R, int64_t d, double alpha, double gscale, const void* gdev,     \
                                          void* loss, void* corr) {                                                \
    hc::launch_mroute_finish<scalar_t, acc_t>(static_cast<const scalar_t*>(h), static_cast<const acc_t*>(u),      \
                                              static_cast<const acc_t*>(v), static_cast<const acc_t*>(inv_n), R,  \
                                              d, static_cast<acc_t>(alpha), scale_of<acc_t>(gscale, gdev),        \
                                              static_cast<acc_t*>(loss), static_cast<scalar_t*>(corr), nullptr);  \
  }                                                                                                                \
  extern "C" void emu_gather_correction_##tag(const void* h, const void* coef, int64_t R, int64_t d, void* corr) { \
    hc::launch_gather_correction<scalar_t, acc_t>(static_cast<const scalar_t*>(h), static_cast<const acc_t*>(coef), \
                                                  R, d, static_cast<scalar_t*>(corr), nullptr);                   \
  }                                                                                                                \
  extern "C" void emu_row_inv_norm_##tag(const void* W, int64_t K, int64_t d, void* out) {                         \
    hc::launch_row_inv_norm<scalar_t, acc_t>(static_cast<const scalar_t*>(W), K, d, static_cast<acc_t*>(out),     \
                                             nullptr);                                                             \
  }

EMU_WRAP(f32, float, float)
EMU_WRAP(f64, double, double)
EMU_WRAP(bf16, __nv_bfloat16, float)
EMU_WRAP(f16, __half, float)
