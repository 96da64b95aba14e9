// Host-side input checks of fused_loss, shared by every backend (run before any kernel).
#pragma once

#include <ATen/ATen.h>

namespace haframe {

// Validates shapes, dtypes, devices, alpha and the label range; raises a clear error otherwise.
inline void check_fused_loss_inputs(const at::Tensor& features,                  // [B, d]
                                    const at::Tensor& weight,                    // [K, d]
                                    const at::Tensor& target,                    // [B]
                                    const c10::optional<at::Tensor>& similarity, // [K, K]
                                    const c10::optional<at::Tensor>& gram,       // [d, d]
                                    double alpha, int64_t ignore_index) {
  TORCH_CHECK(features.dim() == 2, "features must be 2-D (B, d), got ", features.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (K, d), got ", weight.sizes());
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "weight is (K=", K, ", d=", weight.size(1), ") but features have d=", d,
              ": the frame's dimension must equal the feature dimension");
  TORCH_CHECK(K >= 1, "weight must have at least one class row");
  TORCH_CHECK(at::isFloatingType(features.scalar_type()) && features.scalar_type() == weight.scalar_type(),
              "features and weight must share one floating dtype (float16/bfloat16/float32/float64), got ",
              features.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == B, "target must be 1-D with one label per row (B=", B,
              "), got ", target.sizes());
  TORCH_CHECK(features.device() == weight.device() && features.device() == target.device(),
              "features (", features.device(), "), weight (", weight.device(), ") and target (", target.device(),
              ") must be on the same device");
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(similarity.has_value() != gram.has_value(),
              "pass exactly one of similarity ([K, K], gather route) or gram ([d, d], M route)");
  const at::ScalarType acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (similarity.has_value()) {
    TORCH_CHECK(similarity->dim() == 2 && similarity->size(0) == K && similarity->size(1) == K,
                "similarity must be (K, K) = (", K, ", ", K, "), got ", similarity->sizes());
    TORCH_CHECK(similarity->scalar_type() == acc, "similarity must be ", acc, " for ", features.scalar_type(),
                " features, got ", similarity->scalar_type());
    TORCH_CHECK(similarity->device() == features.device(), "similarity is on ", similarity->device(),
                ", features on ", features.device());
  } else {
    TORCH_CHECK(gram->dim() == 2 && gram->size(0) == d && gram->size(1) == d, "gram must be (d, d) = (", d, ", ",
                d, "), got ", gram->sizes());
    TORCH_CHECK(gram->scalar_type() == acc, "gram must be ", acc, " for ", features.scalar_type(),
                " features, got ", gram->scalar_type());
    TORCH_CHECK(gram->device() == features.device(), "gram is on ", gram->device(), ", features on ",
                features.device());
  }
  if (B > 0) {
    // Label range on the host, before any kernel can index with it (never a device-side assert).
    const at::Tensor bad = ((target < 0) | (target >= K)) & (target != ignore_index);
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "target[", i, "] = ", target[i].item<int64_t>(),
                        " is not a class index: labels must be in [0, ", K, ") or equal ignore_index=",
                        ignore_index);
    }
  }
}

// Bytes of logits a backend may hold at once; rows are processed in chunks of this size.
inline int64_t rows_per_chunk(int64_t B, int64_t K, int64_t elem_bytes, int64_t budget_bytes) {
  int64_t r = budget_bytes / std::max<int64_t>(1, K * elem_bytes);
  return std::max<int64_t>(1, std::min<int64_t>(B, r));
}

}  // namespace haframe
