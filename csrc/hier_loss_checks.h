// Host-side input checks of hier_loss, shared by every backend: a bad argument is a one-line error, never
// an out-of-bounds read in a kernel.
#pragma once

#include <ATen/ATen.h>

#include "fused_loss_checks.h"
#include "hier_math.h"

namespace haframe {

// Whether every path row is nested ranges inside [0, K): entry 0 is [0, K), each valid entry (start >= 0) lies
// inside the one before, and entries past the first invalid one are -1 (a loop on the CPU, ATen ops elsewhere).
inline bool paths_are_nested(const at::Tensor& start, const at::Tensor& end, int64_t K) {  // [B, P] each
  const int64_t B = start.size(0), P = start.size(1);
  if (start.is_cpu()) {
    const at::Tensor s = start.contiguous(), e = end.contiguous();
    const int64_t *sp = s.data_ptr<int64_t>(), *ep = e.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t *ps = sp + b * P, *pe = ep + b * P;
      if (ps[0] != 0 || pe[0] != K) return false;
      bool live = true;
      for (int64_t i = 1; i < P; ++i) {
        if (ps[i] < 0) {
          if (ps[i] != -1 || pe[i] != -1) return false;
          live = false;
        } else if (!live || ps[i] >= pe[i] || ps[i] < ps[i - 1] || pe[i] > pe[i - 1]) {
          return false;
        }
      }
    }
    return true;
  }
  using at::indexing::None;
  using at::indexing::Slice;
  const at::Tensor valid = start >= 0;
  at::Tensor bad = (valid & ((start >= end) | (end > K))) | (~valid & ((start != -1) | (end != -1)));
  bad = bad.any(1) | (start.select(1, 0) != 0) | (end.select(1, 0) != K);
  if (P > 1) {
    const at::Tensor v1 = valid.index({Slice(), Slice(1, None)});
    const at::Tensor nested = (start.index({Slice(), Slice(1, None)}) >= start.index({Slice(), Slice(0, -1)})) &
                              (end.index({Slice(), Slice(1, None)}) <= end.index({Slice(), Slice(0, -1)})) &
                              valid.index({Slice(), Slice(0, -1)});
    bad = bad | (v1 & ~nested).any(1);
  }
  return !bad.any().item<bool>();
}

// Validates shapes, dtypes, devices and the label paths (nested ranges inside [0, K), the root first).
inline void check_hier_loss_inputs(const at::Tensor& features,                  // [B, d]
                                   const at::Tensor& weight,                    // [K, d]
                                   const c10::optional<at::Tensor>& bias,       // [K]
                                   const c10::optional<at::Tensor>& order,      // [K]
                                   const at::Tensor& start,                     // [B, P]
                                   const at::Tensor& end,                       // [B, P]
                                   const at::Tensor& value,                     // [B, P]
                                   int64_t kind,
                                   const c10::optional<at::Tensor>& row_scale,  // [B]
                                   int64_t reduction) {
  TORCH_CHECK_VALUE(features.dim() == 2, "features must be 2-D (B, d), got shape ", features.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (K, d), got shape ", weight.sizes());
  const int64_t B = features.size(0), d = features.size(1), K = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == d, "weight is (K=", K, ", d=", weight.size(1), ") but features have d=", d,
                    ": they must agree");
  TORCH_CHECK_VALUE(K >= 1, "weight must have at least one class row");
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()) && features.scalar_type() == weight.scalar_type(),
                   "features and weight must share one floating point dtype, got ", features.scalar_type(), " and ",
                   weight.scalar_type());
  const auto dev = features.device();
  TORCH_CHECK_VALUE(weight.device() == dev, "weight is on ", weight.device(), ", features on ", dev);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == K, "bias must be [K=", K, "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == features.scalar_type(), "bias must be ", features.scalar_type(), ", got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == dev, "bias is on ", bias->device(), ", features on ", dev);
  }
  TORCH_CHECK_VALUE(kind == kHierTelescoping || kind == kHierSoft, "kind must be 0 (HXE/CE) or 1 (soft labels), got ",
                    kind);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  TORCH_CHECK_VALUE(start.dim() == 2 && start.size(0) == B && start.size(1) >= 1 && end.sizes() == start.sizes() &&
                        value.sizes() == start.sizes(),
                    "path_start, path_end and path_value must be [B=", B, ", P >= 1], got ", start.sizes(), ", ",
                    end.sizes(), " and ", value.sizes());
  TORCH_CHECK_TYPE(start.scalar_type() == at::kLong && end.scalar_type() == at::kLong &&
                       value.scalar_type() == at::kDouble,
                   "path_start and path_end must be int64 and path_value float64");
  TORCH_CHECK_VALUE(start.device() == dev && end.device() == dev && value.device() == dev,
                    "the label paths must be on the features' device ", dev);
  if (row_scale.has_value()) {
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == B, "row_scale must be [B=", B, "], got shape ",
                      row_scale->sizes());
    TORCH_CHECK_VALUE(row_scale->device() == dev, "row_scale is on ", row_scale->device(), ", features on ", dev);
  }
  if (order.has_value()) {
    TORCH_CHECK_VALUE(order->dim() == 1 && order->size(0) == K && order->scalar_type() == at::kLong &&
                          order->device() == dev,
                      "order must be an int64 [K=", K, "] tensor on ", dev, ", got ", order->scalar_type(), " ",
                      order->sizes());
    bool bad = false;
    if (order->is_cpu()) {
      const at::Tensor o = order->contiguous();
      const int64_t* op = o.data_ptr<int64_t>();
      for (int64_t k = 0; k < K && !bad; ++k) bad = op[k] < 0 || op[k] >= K;
    } else {
      bad = ((*order < 0) | (*order >= K)).any().item<bool>();
    }
    TORCH_CHECK_VALUE(!bad, "order must hold class indices in [0, ", K, ")");
  }
  TORCH_CHECK_VALUE(B == 0 || paths_are_nested(start, end, K),
                    "the label paths must be nested depth-first ranges inside [0, ", K,
                    "), the root's first (build them with haframe_ext.hier_ranges.HierRanges.paths)");
}

}  // namespace haframe
