"""The fused loss's arguments: alpha, cosine_scale and its rule, ignore_index and reduction as Python values, and the
shape, dtype, device and unit-row checks that both backends share."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

__all__ = ["as_alpha", "as_cosine_scale", "cosine_scale_for", "COSINE_SCALES", "UNIT_ROW_TOL", "acc_dtype",
           "int_scalar", "scalar_args", "check_args", "check_unit_rows"]

UNIT_ROW_TOL = 1e-2  # | ||w_k|| - 1 | allowed with gram= (bf16 rounding of a frame stays far below it)
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- input checks
def as_alpha(value, *, check_range: bool = True) -> float:
    """alpha as a Python float: an int, float, numpy or one-element torch number (never a str, bool or complex),
    in [0, 1] unless check_range is False (the native op checks the range itself)."""
    if type(value) is float:  # the usual call, without the abstract-class checks below
        if check_range and not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        return value
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok:
        raise TypeError(f"alpha must be a real number in [0, 1] (int, float, numpy or 0-dim tensor), got {value!r}")
    alpha = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if check_range and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


COSINE_SCALES = ("auto", "sum")  # the named rules of cosine_scale_for


def cosine_scale_for(rule, num_classes: int, dim: int) -> float:
    """The cosine term's multiplier ``c`` for a [K, d] frame: "auto" is ``min(d, K) / K``, "sum" 1, a number itself.

    With unit rows the cosine term is ``u^T M u`` (``M = W^T W``, trace K), whose nonzero eigenvalues average
    ``K / min(d, K)``: 1 for the paper's frames (d >= K), K/d below that (31 for K = 8004, d = 256), where the
    summed term outweighs the cross entropy by that factor. "auto" divides it back out (docs/design.md section 2c).
    """
    if isinstance(rule, str):
        if rule == "sum":
            return 1.0
        if rule == "auto":
            return min(int(dim), int(num_classes)) / int(num_classes)
        raise ValueError(f"cosine_scale must be 'auto', 'sum' or a number > 0, got {rule!r}")
    return as_cosine_scale(rule)


def as_cosine_scale(value) -> float:
    """cosine_scale as a Python float: a finite real number > 0 (never a str or bool)."""
    if type(value) is float and value > 0 and math.isfinite(value):  # the usual call, checked at once
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value.detach())
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"cosine_scale must be a real number > 0, got {value!r}")
    c = float(value)
    if not (c > 0 and math.isfinite(c)):  # math, not numpy: torch.compile traces numpy calls as tensor ops
        raise ValueError(f"cosine_scale must be a finite number > 0, got {c}")
    return c


def int_scalar(value) -> int:
    """ignore_index as a Python int: an int, numpy or one-element integer tensor; never a float, str or bool."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"ignore_index must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {value!r}") from None


def scalar_args(alpha, ignore_index, reduction):
    """(alpha, ignore_index) as the Python numbers both backends use, and reduction checked: one conversion
    for both backends, so that they accept the same inputs (alpha's range: see check_args)."""
    alpha, ignore_index = as_alpha(alpha, check_range=False), int_scalar(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return alpha, ignore_index


def check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram=None, *,
                native=False, tracing=False):
    """Raise a clear error for bad shapes, dtypes or devices; return (alpha, ignore_index) as Python numbers.

    The native op checks alpha's range and the labels itself (csrc/fused_loss_checks.h); here they are
    checked for the reference path only, and labels not while tracing (that would read the data)."""
    if not isinstance(features, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("features and weight must be torch.Tensor")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (B, d), got shape {tuple(features.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (K, d), got shape {tuple(weight.shape)}")
    B, d = features.shape
    K = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"weight is (K={K}, d={weight.shape[1]}) but features have d={d}: "
            "the frame's dimension must equal the feature dimension")
    if K < 1:
        raise ValueError("weight must have at least one class row")
    if features.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"features and weight must be floating point (float16/bfloat16/float32/float64), "
            f"got {features.dtype} and {weight.dtype}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices (e.g. torch.long), got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must be 1-D with one label per row (B={B}), got shape {tuple(target.shape)}")
    if features.device != weight.device or features.device != target.device:
        raise ValueError(
            f"features ({features.device}), weight ({weight.device}) and target ({target.device}) "
            "must be on the same device")
    for name, extra, sym, n in (("similarity", similarity, "K", K), ("gram", gram, "d", d)):
        if extra is None:
            continue
        if not isinstance(extra, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor ({n}, {n}), got {type(extra).__module__}."
                            f"{type(extra).__name__}")
        if extra.is_complex() or extra.dtype == torch.bool:
            raise TypeError(f"{name} must be real (floating point or integer), got {extra.dtype}")
        if tuple(extra.shape) != (n, n):
            raise ValueError(f"{name} must be ({sym}, {sym}) = ({n}, {n}), got {tuple(extra.shape)}")
        if extra.device != features.device:
            raise ValueError(f"{name} is on {extra.device}, features on {features.device}")
    alpha, ignore_index = scalar_args(alpha, ignore_index, reduction)
    if native:
        return alpha, ignore_index
    as_alpha(alpha)
    if B > 0 and not tracing:
        bad = ((target < 0) | (target >= K)) & (target != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is not a class index: labels must be in [0, {K}) "
                f"or equal ignore_index={ignore_index}")
    return alpha, ignore_index


def check_unit_rows(weight: torch.Tensor) -> None:  # weight: [K, d]
    """The reference's copy of the op's gram= rule (csrc/fused_loss_checks.h): rows unit within UNIT_ROW_TOL."""
    worst = float((torch.linalg.vector_norm(weight.detach().to(acc_dtype(weight.dtype)), dim=1) - 1).abs().max())
    if worst > UNIT_ROW_TOL:
        raise ValueError(
            f"gram= needs unit rows of weight (| ||w_k|| - 1 | <= {UNIT_ROW_TOL}), but a row norm is off by "
            f"{worst:.3g}: pass similarity= (any rows) instead, or normalise the rows")
