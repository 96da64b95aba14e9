"""The fused op's fake (meta) implementation for torch.compile and meta tensors: the C++ input checks of
csrc/fused_loss_checks.h restated on fake tensors (same order, error types and messages), and the output shapes."""

from __future__ import annotations

import torch

from .fused_args import acc_dtype

__all__ = ["fused_fake", "fused_fake_checks"]


# ATen's names of the dtypes (how the C++ op's messages print a ScalarType)
_ATEN_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
                     torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
                     torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                     torch.complex128: "ComplexDouble"}


def _aten_name(dtype: torch.dtype) -> str:
    """A dtype's name as the C++ op's messages print it."""
    return _ATEN_DTYPE_NAMES.get(dtype, str(dtype))


def fused_fake_checks(features, weight, target, similarity, gram, alpha, reduction):
    """check_fused_loss_inputs of csrc/fused_loss_checks.h on fake tensors: same order, error types and messages."""
    torch._check_value(features.dim() == 2, lambda: f"features must be 2-D (B, d), got shape {list(features.shape)}")
    torch._check_value(weight.dim() == 2, lambda: f"weight must be 2-D (K, d), got shape {list(weight.shape)}")
    B, d, K = features.shape[0], features.shape[1], weight.shape[0]
    torch._check_value(weight.shape[1] == d, lambda: f"weight is (K={K}, d={weight.shape[1]}) but features have "
                       f"d={d}: the frame's dimension must equal the feature dimension")
    torch._check_value(K >= 1, lambda: "weight must have at least one class row")
    torch._check_type(features.dtype.is_floating_point and features.dtype == weight.dtype,
                      lambda: "features and weight must share one floating point dtype (float16/bfloat16/float32/"
                      f"float64), got {_aten_name(features.dtype)} and {_aten_name(weight.dtype)}")
    integral = not (target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool)
    torch._check_type(integral, lambda: f"target must hold integer class indices (e.g. torch.long), got "
                      f"{_aten_name(target.dtype)}")
    torch._check_value(target.dim() == 1 and target.shape[0] == B,
                       lambda: f"target must be 1-D with one label per row (B={B}), got shape {list(target.shape)}")
    torch._check_value(features.device == weight.device == target.device,
                       lambda: f"features ({features.device}), weight ({weight.device}) and target ({target.device}) "
                       "must be on the same device")
    torch._check_value(0.0 <= alpha <= 1.0, lambda: f"alpha must be in [0, 1], got {alpha:g}")
    torch._check_value(0 <= reduction <= 2, lambda: f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    torch._check_value((similarity is None) != (gram is None),
                       lambda: "pass exactly one of similarity ([K, K], gather route) or gram ([d, d], M route)")
    extra, name, n = (similarity, "similarity", K) if similarity is not None else (gram, "gram", d)
    torch._check_value(extra.dim() == 2 and extra.shape[0] == n and extra.shape[1] == n,
                       lambda: f"{name} must be ({n}, {n}), got shape {list(extra.shape)}")
    acc = acc_dtype(features.dtype)
    torch._check_type(extra.dtype == acc, lambda: f"{name} must be {_aten_name(acc)} for {_aten_name(features.dtype)} "
                      f"features, got {_aten_name(extra.dtype)}")
    torch._check_value(extra.device == features.device,
                       lambda: f"{name} is on {extra.device}, features on {features.device}")


def fused_fake(features, weight, target, similarity, gram, alpha, ignore_index, reduction, need_grad):
    """Output shapes of haframe_ext::fused_loss for torch.compile / meta tensors, after the op's input checks."""
    fused_fake_checks(features, weight, target, similarity, gram, alpha, reduction)
    shape = (features.shape[0],) if reduction == 0 else ()
    loss = features.new_empty(shape, dtype=acc_dtype(features.dtype))
    grad = features.new_empty(features.shape if need_grad else (0,))
    return loss, grad
