"""The HAFrame loss: the fused native op (CPU/CUDA) behind autograd, and its plain-PyTorch reference.

Definition (per row b, with h = features[b], y = target[b], z = weight @ h):

    loss_b = (1 - alpha) * (logsumexp(z) - z[y]) + alpha * sum_k (cos(w_k, h) - S[k, y]) ** 2

with ``S = similarity`` when given, else ``weight @ weight.T`` (the two agree for a frame,
whose rows are unit vectors).  Rows whose target equals ``ignore_index`` contribute 0 and
are not counted by ``reduction="mean"``.

Zero-norm rows: when ``||h|| <= EPS`` every cosine is taken as 0, so the cosine term is
``sum_k S[k, y] ** 2`` and it contributes no gradient (the cross entropy still does).
NaN or Inf in a row gives a NaN loss for that row (and for the reduced loss), never an error.
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F

from ._native import native_available

__all__ = ["haframe_loss", "reference_loss", "paper_loss", "fused_loss", "EPS"]

EPS = 1e-8  # norm below which a feature row counts as zero (see module docstring)
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- input checks
def _check_args(features, weight, target, alpha, reduction, ignore_index, similarity, check_labels=True,
                gram=None) -> None:
    """Raise a clear error for bad shapes, dtypes, devices, labels or alpha (before any kernel)."""
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
        if tuple(extra.shape) != (n, n):
            raise ValueError(f"{name} must be ({sym}, {sym}) = ({n}, {n}), got {tuple(extra.shape)}")
        if extra.device != features.device:
            raise ValueError(f"{name} is on {extra.device}, features on {features.device}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}") from None
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if check_labels and B > 0:
        bad = ((target < 0) | (target >= K)) & (target != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is not a class index: labels must be in [0, {K}) "
                f"or equal ignore_index={ignore_index}")


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
def reference_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *,
                   similarity=None):
    """Plain-PyTorch HAFrame loss (autograd for features and weight); the ground truth for every kernel."""
    _check_args(features, weight, target, alpha, reduction, ignore_index, similarity)
    acc = _acc_dtype(features.dtype)
    h = features.to(acc)  # [B, d]
    w = weight.to(acc)  # [K, d]
    S = w @ w.T if similarity is None else similarity.to(acc)  # [K, K]
    valid = target != ignore_index  # [B]
    y = torch.where(valid, target, 0).long()  # [B]
    logits = h @ w.T  # [B, K]
    ce = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)
    n = torch.linalg.vector_norm(h, dim=1)  # [B]
    wn = torch.linalg.vector_norm(w, dim=1).clamp_min(EPS)  # [K]
    nonzero = n > EPS
    cos = logits / (torch.where(nonzero, n, 1.0)[:, None] * wn[None, :])
    cos = torch.where(nonzero[:, None], cos, 0.0)
    target_sim = S.index_select(1, y).T  # [B, K]: row b is S[:, y_b]
    lcos = ((cos - target_sim) ** 2).sum(dim=1)
    rows = torch.where(valid, (1.0 - alpha) * ce + alpha * lcos, 0.0)
    return _reduce(rows, valid, reduction)


def paper_loss(features, weight, target, alpha=0.4, *, similarity=None):
    """The paper code's formulation: CE plus a per-class loop of cosine_similarity, summed, / batch size."""
    S = weight @ weight.T if similarity is None else similarity
    ce = F.cross_entropy(features @ weight.T, target)
    lcos = features.new_zeros(())
    for k in range(weight.shape[0]):
        cos_k = F.cosine_similarity(features, weight[k][None, :], dim=1)
        lcos = lcos + ((cos_k - S[k, target]) ** 2).sum()
    return (1.0 - alpha) * ce + alpha * lcos / features.shape[0]


# ----------------------------------------------------------------------------- native op: fake
_NATIVE = native_available()
_MROUTE_MIN_K = 4096  # above this (and K > d), S would be large: use the M route when rows are unit
_REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # ATen's at::Reduction order


def _fused_fake(features, weight, target, similarity, gram, alpha, ignore_index, reduction, need_grad):
    """Output shapes of haframe_ext::fused_loss for torch.compile / meta tensors (devices checked as the op does)."""
    for name, t in (("weight", weight), ("target", target), ("similarity", similarity), ("gram", gram)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}: "
                             "all inputs must be on the same device")
    shape = (features.shape[0],) if reduction == 0 else ()
    loss = features.new_empty(shape, dtype=_acc_dtype(features.dtype))
    grad = features.new_empty(features.shape if need_grad else (0,))
    return loss, grad


if _NATIVE:  # the autograd formula is registered in C++ (csrc/autograd.cpp)
    torch.library.register_fake("haframe_ext::fused_loss")(_fused_fake)


def fused_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *, similarity=None,
               gram=None, need_grad=None):
    """The native op with autograd: exactly one of similarity [K, K] / gram [d, d], dtypes as the op wants."""
    if need_grad is None:
        need_grad = torch.is_grad_enabled() and features.requires_grad
    loss, _ = torch.ops.haframe_ext.fused_loss(features, weight, target, similarity, gram, float(alpha),
                                               int(ignore_index), _REDUCTION_CODE[reduction], bool(need_grad))
    return loss


# ----------------------------------------------------------------------------- derived-matrix cache
_CACHE: dict = {}


_MAX_SIMILARITY_BYTES = 2 << 30  # refuse to build a K x K similarity larger than this


def _cache_key(weight: torch.Tensor, dtype: torch.dtype, acc: torch.dtype):
    return (id(weight), weight._version, dtype, acc, weight.device, tuple(weight.shape))


def _cached(weight: torch.Tensor, dtype: torch.dtype, acc: torch.dtype):
    """The cached (weight in dtype, similarity, gram) of this weight version, or None."""
    hit = _CACHE.get(_cache_key(weight, dtype, acc))
    return hit[1] if hit is not None and hit[0]() is weight else None


def _derived(weight: torch.Tensor, dtype: torch.dtype, acc: torch.dtype):
    """(weight in dtype, similarity, gram) for a frozen weight, once per weight version (one of the two is None)."""
    key = _cache_key(weight, dtype, acc)
    hit = _cached(weight, dtype, acc)
    if hit is not None:
        return hit
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "haframe_loss derives S (or M) for a new weight on its first call, which needs the device and cannot "
            "run inside CUDA-graph capture: make one call before capturing (a warm-up step), or pass "
            "similarity= / gram=")
    w_cast = weight.detach().to(dtype)
    w = w_cast.to(acc)
    K, d = w.shape
    # unit rows, up to the rounding of the weight's dtype (bf16 rows are 1 +- ~2e-4)
    tol = max(1e-4, 2 * torch.finfo(dtype).eps)
    unit = bool((torch.linalg.vector_norm(w, dim=1) - 1).abs().max() < tol)
    if unit and K > d and K > _MROUTE_MIN_K:
        value = (w_cast, None, w.T @ w)  # [d, d] M route
    else:
        nbytes = K * K * w.element_size()
        if nbytes > _MAX_SIMILARITY_BYTES:
            raise ValueError(
                f"the fused loss needs S = weight @ weight.T ({K} x {K}, {nbytes / 2**30:.1f} GiB) because the "
                "rows of weight are not unit vectors; normalise the rows (a frame's are) so that the d x d route "
                "applies, or pass similarity= / gram= explicitly")
        value = (w_cast, w @ w.T, None)  # [K, K] gather route (S = W W^T by definition)
    for k in [k for k, v in _CACHE.items() if v[0]() is None]:
        del _CACHE[k]
    _CACHE[key] = (weakref.ref(weight), value)
    return value


# ----------------------------------------------------------------------------- public entry point
def haframe_loss(features, weight, target, alpha=0.4, reduction="mean", ignore_index=-100, *,
                 similarity=None, gram=None, backend="auto"):
    """HAFrame loss (module docstring); the fused native op on CPU/CUDA, the reference otherwise.

    features [B, d] (float16/bfloat16/float32/float64; weight is cast to their dtype), weight [K, d]
    (frozen: the fused op computes no weight gradient), target [B] int. ``similarity`` [K, K] (the
    frame's target cosines, symmetric) or ``gram`` [d, d] (weight.T @ weight, unit rows) may be passed
    to skip computing them; otherwise they are derived once per weight version and cached.
    backend: "auto" (native when available), "native" (error if unavailable) or "reference".
    The loss is float32 (float64 for float64 features); the gradient is computed in the forward pass,
    so backward only scales it (retain_graph works; double backward raises).
    """
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "native" and not _NATIVE:
        from ._native import native_error
        raise RuntimeError(f"backend='native' but the compiled extension is unavailable: {native_error()}")
    use_native = backend != "reference" and _NATIVE
    if use_native and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the fused HAFrame loss is for fixed frames and computes no gradient for `weight`, but "
            "weight.requires_grad is True: freeze it (weight.requires_grad_(False), or register it as a "
            "buffer), or pass backend='reference' to train the classifier with the plain-PyTorch loss")
    compiling = torch.compiler.is_compiling()
    _check_args(features, weight, target, alpha, reduction, ignore_index, similarity,
                check_labels=not use_native and not compiling, gram=gram)
    if not use_native:
        return reference_loss(features, weight, target, alpha, reduction, ignore_index, similarity=similarity)
    acc = _acc_dtype(features.dtype)
    if similarity is None and gram is None and not compiling:
        weight, similarity, gram = _derived(weight, features.dtype, acc)
    else:
        weight = weight.to(features.dtype)
        if similarity is not None:
            similarity, gram = similarity.to(acc).contiguous(), None
        elif gram is not None:
            gram = gram.to(acc).contiguous()
        else:  # traced by torch.compile: no Python-side cache
            w = weight.detach().to(acc)
            similarity = w @ w.T
    return fused_loss(features, weight, target, alpha, reduction, ignore_index, similarity=similarity, gram=gram)
