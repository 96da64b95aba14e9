"""The HAFrame loss: the fused native op (CPU/CUDA) behind autograd, and its plain-PyTorch reference.

Definition (per row b, with h = features[b], y = target[b], z = weight @ h):

    loss_b = (1 - alpha) * (logsumexp(z) - z[y]) + alpha * c * sum_k (cos(w_k, h) - S[y, k]) ** 2

with ``c = cosine_scale`` (1, the paper's sum, by default; :func:`cosine_scale_for` gives the rule that keeps the
cosine term at the paper's weight when the frame's dimension d is below K: ``c = min(d, K) / K``).

with ``S = similarity`` when given, else ``weight @ weight.T`` (the two agree for a frame,
whose rows are unit vectors).  Row y of ``similarity`` is the target of label y, so a non-symmetric
``similarity`` has a defined meaning.  With ``gram`` = G (d x d) instead, the rows of weight must be
unit (within ``UNIT_ROW_TOL``) and the cosine term is ``u^T G u`` with ``u = h / ||h|| - w_y``, which
equals the sum above for ``G = weight.T @ weight``.  Rows whose target equals ``ignore_index``
contribute 0 and are not counted by ``reduction="mean"``.

Zero-norm rows: when ``||h|| <= EPS`` every cosine is taken as 0, so the cosine term is
``sum_k S[y, k] ** 2`` and it contributes no gradient (the cross entropy still does).
NaN or Inf in a row gives a NaN loss for that row (and for the reduced loss), never an error.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch
import torch.nn.functional as F

from .fused_fake import fused_fake
from .native import native_available
from ..sizes import DENSE_MAX_K

__all__ = ["haframe_loss", "reference_loss", "paper_loss", "fused_loss", "derive_similarity_or_gram", "as_alpha",
           "as_cosine_scale", "cosine_scale_for", "COSINE_SCALES", "EPS", "UNIT_ROW_TOL"]

EPS = 1e-8  # norm below which a feature row counts as zero (see module docstring)
UNIT_ROW_TOL = 1e-2  # | ||w_k|| - 1 | allowed with gram= (bf16 rounding of a frame stays far below it)
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _int_scalar(value) -> int:
    """ignore_index as a Python int: an int, numpy or one-element integer tensor; never a float, str or bool."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"ignore_index must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {value!r}") from None


def _scalar_args(alpha, ignore_index, reduction):
    """(alpha, ignore_index) as the Python numbers both backends use, and reduction checked: one conversion
    for both backends, so that they accept the same inputs (alpha's range: see _check_args)."""
    alpha, ignore_index = as_alpha(alpha, check_range=False), _int_scalar(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return alpha, ignore_index


def _check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram=None, *,
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
    alpha, ignore_index = _scalar_args(alpha, ignore_index, reduction)
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


def _check_unit_rows(weight: torch.Tensor) -> None:  # weight: [K, d]
    """The reference's copy of the op's gram= rule (csrc/fused_loss_checks.h): rows unit within UNIT_ROW_TOL."""
    worst = float((torch.linalg.vector_norm(weight.detach().to(_acc_dtype(weight.dtype)), dim=1) - 1).abs().max())
    if worst > UNIT_ROW_TOL:
        raise ValueError(
            f"gram= needs unit rows of weight (| ||w_k|| - 1 | <= {UNIT_ROW_TOL}), but a row norm is off by "
            f"{worst:.3g}: pass similarity= (any rows) instead, or normalise the rows")


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply 'mean' (over non-ignored rows), 'sum' or 'none' to per-row losses."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().to(rows.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- reference
def _usable_in_autograd(t):
    """t, cloned when it is an inference tensor that autograd would have to save (features needing a gradient)."""
    if t is not None and t.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def reference_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *,
                   similarity=None, gram=None, cosine_scale=1.0):
    """Plain-PyTorch HAFrame loss (autograd for features and weight); the ground truth for every kernel."""
    c = as_cosine_scale(cosine_scale)
    alpha, ignore_index = _check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram)
    if similarity is not None and gram is not None:
        raise ValueError("pass at most one of similarity ([K, K]) and gram ([d, d])")
    if gram is not None:
        _check_unit_rows(weight)
    weight, similarity, gram = (_usable_in_autograd(t) for t in (weight, similarity, gram))
    acc = _acc_dtype(features.dtype)
    h = features.to(acc)  # [B, d]
    w = weight.to(acc)  # [K, d]
    valid = target != ignore_index  # [B]
    y = torch.where(valid, target, 0).long()  # [B]
    logits = h @ w.T  # [B, K]
    ce = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)
    n = torch.linalg.vector_norm(h, dim=1)  # [B]
    nonzero = n > EPS
    if gram is not None:  # u^T G u with u = h / ||h|| - w_y (a zero row: h / ||h|| = 0)
        hh = torch.where(nonzero[:, None], h / torch.where(nonzero, n, 1.0)[:, None], 0.0)
        u = hh - w.index_select(0, y)  # [B, d]
        lcos = ((u @ gram.to(acc)) * u).sum(dim=1)
    else:
        S = w @ w.T if similarity is None else similarity.to(acc)  # [K, K]
        wn = torch.linalg.vector_norm(w, dim=1).clamp_min(EPS)  # [K]
        cos = logits / (torch.where(nonzero, n, 1.0)[:, None] * wn[None, :])
        cos = torch.where(nonzero[:, None], cos, 0.0)
        target_sim = S.index_select(0, y)  # [B, K]: row b is S[y_b, :], the target row of label y_b
        lcos = ((cos - target_sim) ** 2).sum(dim=1)
    rows = torch.where(valid, (1.0 - alpha) * ce + (alpha * c) * lcos, 0.0)
    return _reduce(rows, valid, reduction)


def paper_loss(features, weight, target, alpha=0.4, *, similarity=None):
    """The paper code's formulation: CE plus a per-class loop of cosine_similarity, summed, / batch size.

    The paper's S is symmetric; ``S[target, k]`` is the row convention of :func:`reference_loss`."""
    S = weight @ weight.T if similarity is None else similarity
    ce = F.cross_entropy(features @ weight.T, target)
    lcos = features.new_zeros(())
    for k in range(weight.shape[0]):
        cos_k = F.cosine_similarity(features, weight[k][None, :], dim=1)
        lcos = lcos + ((cos_k - S[target, k]) ** 2).sum()
    return (1.0 - alpha) * ce + alpha * lcos / features.shape[0]


# ----------------------------------------------------------------------------- native op
_NATIVE = native_available()
_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # ATen's at::Reduction order

if _NATIVE:  # the autograd formula is registered in C++ (csrc/autograd.cpp)
    torch.library.register_fake("haframe_ext::fused_loss")(fused_fake)


def fused_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *, similarity=None,
               gram=None, need_grad=None):
    """The native op with autograd: exactly one of similarity [K, K] / gram [d, d], dtypes as the op wants."""
    if need_grad is None:
        need_grad = torch.is_grad_enabled() and features.requires_grad
    loss, _ = torch.ops.haframe_ext.fused_loss(features, weight, target, similarity, gram,
                                               as_alpha(alpha, check_range=False),
                                               _int_scalar(ignore_index), _REDUCTION_CODE[reduction], bool(need_grad))
    return loss


# ----------------------------------------------------------------------------- S or M from the weight
_MAX_SIMILARITY_BYTES = 2 << 30  # refuse to build a K x K similarity larger than this


def _unit_rows(w: torch.Tensor, dtype: torch.dtype) -> bool:  # w: [K, d] in the accumulation dtype
    """True when every row is a unit vector up to the rounding of dtype (bf16 rows are 1 +- ~2e-4)."""
    tol = max(1e-4, 2 * torch.finfo(dtype).eps)
    return bool((torch.linalg.vector_norm(w, dim=1) - 1).abs().max() < tol)


def derive_similarity_or_gram(weight: torch.Tensor, dtype: torch.dtype = torch.float32):
    """``(similarity [K, K], None)`` or ``(None, gram [d, d])`` of a frozen weight [K, d], in dtype's accumulation.

    The d x d gram ``weight.T @ weight`` when the rows are unit (to dtype's rounding) and K > max(d, DENSE_MAX_K);
    else ``weight @ weight.T``. Computed on every call, never cached: a module that calls the loss
    repeatedly holds the result (:class:`haframe_ext.nn.FixedFrameClassifier`).
    """
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "haframe_loss without similarity= or gram= derives S (or M) from the weight, which reads it on the "
            "host and cannot run inside CUDA-graph capture: compute it once before capturing "
            "(haframe_ext.ops.derive_similarity_or_gram) and pass it as similarity= / gram=")
    acc = _acc_dtype(dtype)
    w = weight.detach().to(dtype).to(acc)  # [K, d], rounded as the op will see it
    K, d = w.shape
    if K > d and K > DENSE_MAX_K and _unit_rows(w, dtype):
        return None, w.T @ w  # [d, d] M route
    nbytes = K * K * w.element_size()
    if nbytes > _MAX_SIMILARITY_BYTES:
        raise ValueError(
            f"the fused loss needs S = weight @ weight.T ({K} x {K}, {nbytes / 2**30:.1f} GiB) because the "
            "rows of weight are not unit vectors; normalise the rows (a frame's are) so that the d x d route "
            "applies, or pass similarity= / gram= explicitly")
    return w @ w.T, None  # [K, K] gather route (S = W W^T by definition)


# ----------------------------------------------------------------------------- public entry point
def haframe_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *,
                 similarity=None, gram=None, backend="auto", cosine_scale=1.0):
    """HAFrame loss (module docstring); the fused native op on CPU/CUDA, the reference otherwise.

    features [B, d] (float16/bfloat16/float32/float64; weight is cast to their dtype), weight [K, d]
    (frozen: the fused op computes no weight gradient), target [B] int. ``similarity`` [K, K] (row y: the
    target cosines of label y) or ``gram`` [d, d] (weight.T @ weight, unit rows) should be passed when
    the loss is called repeatedly (see :func:`derive_similarity_or_gram`); without them one is derived
    from the weight's current values on every call, which costs a K x d x K (or d x K x d) product (none at
    alpha = 0 on the CPU, where the op computes the cross entropy alone).
    alpha: a real number in [0, 1] (numpy and 0-dim tensors included); ignore_index: an int.
    cosine_scale: the cosine term's multiplier c > 0 (module docstring; :func:`cosine_scale_for` gives the
    rule the modules use). The native op computes ``t * fused(alpha')`` with ``t = (1 - alpha) + alpha c`` and
    ``alpha' = alpha c / t``, the same loss and gradient.
    backend: "auto" (native when available), "native" (error if unavailable) or "reference".
    The loss is float32 (float64 for float64 features); the gradient is computed in the forward pass,
    so backward only scales it (retain_graph works; double backward raises).
    """
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "native" and not _NATIVE:
        from .native import native_error
        raise RuntimeError(f"backend='native' but the compiled extension is unavailable: {native_error()}")
    use_native = backend != "reference" and _NATIVE
    compiling = torch.compiler.is_compiling()
    alpha, ignore_index = _check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram,
                                      native=use_native, tracing=compiling)
    c = as_cosine_scale(cosine_scale)
    if not use_native:
        return reference_loss(features, weight, target, alpha, reduction, ignore_index, similarity=similarity,
                              gram=gram, cosine_scale=c)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the fused HAFrame loss is for fixed frames and computes no gradient for `weight`, but "
            "weight.requires_grad is True: freeze it (weight.requires_grad_(False), or register it as a "
            "buffer), or pass backend='reference' to train the classifier with the plain-PyTorch loss")
    acc = _acc_dtype(features.dtype)
    if alpha == 0.0 and gram is None and features.device.type == "cpu":
        # cross entropy alone: the CPU op reads no S (nor M), so zeros of stride 0 stand in (no K x K work or memory)
        similarity = features.new_zeros((), dtype=acc).expand(weight.shape[0], weight.shape[0])
    elif similarity is None and gram is None:
        if compiling:  # traced by torch.compile: no data-dependent route choice
            w = weight.detach().to(acc)
            similarity = w @ w.T
        else:
            similarity, gram = derive_similarity_or_gram(weight, features.dtype)
    elif similarity is not None and (similarity.dtype != acc or not similarity.is_contiguous()):
        similarity = similarity.to(acc).contiguous()  # a frame's S held by the modules is already both
    if gram is not None:  # the kernels' gradient 2 G u assumes a symmetric G; u^T G u is the same for (G + G^T) / 2
        gram = gram.to(acc)
        gram = ((gram + gram.transpose(0, 1)) * 0.5).contiguous()  # bit-identical for a symmetric G
    if weight.dtype != features.dtype:
        weight = weight.to(features.dtype)
    if c == 1.0:
        return fused_loss(features, weight, target, alpha, reduction, ignore_index, similarity=similarity, gram=gram)
    total = (1.0 - alpha) + alpha * c  # > 0, since c > 0
    return total * fused_loss(features, weight, target, alpha * c / total, reduction, ignore_index,
                              similarity=similarity, gram=gram)
