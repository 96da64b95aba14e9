// Every op signature of haframe_ext, in one place. Kernels register per backend in csrc/cpu and csrc/cuda.
#include <torch/library.h>

TORCH_LIBRARY(haframe_ext, m) {
  // Fused HAFrame loss for a frozen frame. Returns (loss [B] in float32, float64 for float64 inputs;
  // grad [B, d] = d loss_b / d features_b in the features' dtype, or an empty tensor when
  // need_grad is false). Exactly one of similarity ([K, K], symmetric: the "gather" route) or
  // gram ([d, d] = weight^T weight, unit rows assumed: the "M" route) must be given.
  m.def(
      "fused_loss(Tensor features, Tensor weight, Tensor target, Tensor? similarity, Tensor? gram, "
      "float alpha, int ignore_index, bool need_grad) -> (Tensor, Tensor)");
}
