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
  // Hierarchical losses (HXE, soft labels, CE) of the logits features @ weight.T + bias, weight trainable.
  //   order ([K]: the label at each depth-first position; absent: identity) and the label paths
  //   path_start/path_end ([B, P] int64: the nested depth-first ranges of the root path, by depth, -1 past
  //   the label) with path_value ([B, P] float64: HXE weights w(v), or exp(-beta level(v) / d_max) for
  //   soft labels) define the loss (csrc/hier_math.h); kind 0: HXE form (CE: path root -> y, weights 0, 1),
  //   1: soft labels. Returns (loss as fused_loss; d loss / d features [B, d], / d weight [K, d], / d bias
  //   [K], each row's gradient times row_scale[b] when given, empty unless need_grad / need_weight_grad).
  m.def(
      "hier_loss(Tensor features, Tensor weight, Tensor? bias, Tensor? order, Tensor path_start, Tensor path_end, "
      "Tensor path_value, int kind, Tensor? row_scale, int reduction, bool need_grad, bool need_weight_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
