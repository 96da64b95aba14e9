// Host-side input checks of fused_loss and small helpers shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

namespace haframe {

// Reduction codes of the op (ATen's at::Reduction order).
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Validates shapes, dtypes, devices, alpha and reduction (labels: see bad_label_message); raises a clear error.
inline void check_fused_loss_inputs(const at::Tensor& features,                  // [B, d]
                                    const at::Tensor& weight,                    // [K, d]
                                    const at::Tensor& target,                    // [B]
                                    const c10::optional<at::Tensor>& similarity, // [K, K]
                                    const c10::optional<at::Tensor>& gram,       // [d, d]
                                    double alpha, int64_t reduction) {
  TORCH_CHECK_VALUE(features.dim() == 2, "features must be 2-D (B, d), got shape ", features.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (K, d), got shape ", weight.sizes());
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == d, "weight is (K=", K, ", d=", weight.size(1), ") but features have d=", d,
                    ": the frame's dimension must equal the feature dimension");
  TORCH_CHECK_VALUE(K >= 1, "weight must have at least one class row");
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()) && features.scalar_type() == weight.scalar_type(),
                   "features and weight must share one floating point dtype (float16/bfloat16/float32/float64), "
                   "got ", features.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                   "target must hold integer class indices (e.g. torch.long), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == B, "target must be 1-D with one label per row (B=", B,
                    "), got shape ", target.sizes());
  TORCH_CHECK_VALUE(features.device() == weight.device() && features.device() == target.device(), "features (",
                    features.device(), "), weight (", weight.device(), ") and target (", target.device(),
                    ") must be on the same device");
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  TORCH_CHECK_VALUE(similarity.has_value() != gram.has_value(),
                    "pass exactly one of similarity ([K, K], gather route) or gram ([d, d], M route)");
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor& extra = similarity.has_value() ? *similarity : *gram;
  const char* name = similarity.has_value() ? "similarity" : "gram";
  const int64_t n = similarity.has_value() ? K : d;
  TORCH_CHECK_VALUE(extra.dim() == 2 && extra.size(0) == n && extra.size(1) == n, name, " must be (", n, ", ", n,
                    "), got shape ", extra.sizes());
  TORCH_CHECK_TYPE(extra.scalar_type() == acc, name, " must be ", acc, " for ", features.scalar_type(),
                   " features, got ", extra.scalar_type());
  TORCH_CHECK_VALUE(extra.device() == features.device(), name, " is on ", extra.device(), ", features on ",
                    features.device());
}

// | ||w_k|| - 1 | allowed with gram (ops.UNIT_ROW_TOL): bf16 rounding of a frame stays far below it.
constexpr double kUnitRowTol = 1e-2;

// gram stands for weight^T weight of unit rows (the M route takes w_k . h / ||h|| as the cosine): refuses
// other rows. Reads the weight back to the host, so a CUDA caller skips it under graph capture.
inline void check_unit_rows_for_gram(const at::Tensor& weight) {  // [K, d]
  const at::ScalarType acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double worst =
      (at::linalg_vector_norm(weight, 2, at::IntArrayRef{1}, false, acc) - 1).abs().max().item<double>();
  TORCH_CHECK_VALUE(!(worst > kUnitRowTol), "gram= needs unit rows of weight (| ||w_k|| - 1 | <= ", kUnitRowTol,
                    "), but a row norm is off by ", worst,
                    ": pass similarity= (any rows) instead, or normalise the rows");
}

// The message for a label outside [0, K) that is not ignore_index (i: its row).
inline std::string bad_label_message(int64_t i, int64_t value, int64_t K, int64_t ignore_index) {
  return c10::str("target[", i, "] = ", value, " is not a class index: labels must be in [0, ", K,
                  ") or equal ignore_index=", ignore_index);
}

// Rows per chunk so that the chunk's logits fit in budget_bytes (at least one row).
inline int64_t rows_per_chunk(int64_t B, int64_t K, int64_t elem_bytes, int64_t budget_bytes) {
  const int64_t r = budget_bytes / std::max<int64_t>(1, K * elem_bytes);
  return std::max<int64_t>(1, std::min<int64_t>(B, r));
}

}  // namespace haframe
