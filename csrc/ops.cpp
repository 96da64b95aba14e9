// Every op signature of haframe_ext, in one place. Kernels register per backend in csrc/cpu and
// csrc/cuda; the autograd formula registers in csrc/autograd.cpp.
#include <torch/library.h>

TORCH_LIBRARY(haframe_ext, m) {
  // Fused HAFrame loss for a frozen frame.
  //   reduction: 0 none (loss [B]), 1 mean over non-ignored rows (loss []), 2 sum (loss []).
  //   Returns (loss in float32, float64 for float64 inputs; grad = d loss / d features [B, d] in the
  //   features' dtype, or an empty tensor when need_grad is false).
  //   Exactly one of similarity ([K, K]: row y is the target of label y, the "gather" route) or gram
  //   ([d, d], standing for weight^T weight: the "M" route, cosine term u^T gram u with
  //   u = h / ||h|| - w_y; the rows of weight must be unit within 1e-2, checked except under CUDA-graph
  //   capture) must be given.
  m.def(
      "fused_loss(Tensor features, Tensor weight, Tensor target, Tensor? similarity, Tensor? gram, "
      "float alpha, int ignore_index, int reduction, bool need_grad) -> (Tensor, Tensor)");
}
