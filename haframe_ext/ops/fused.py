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

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .fused_args import (COSINE_SCALES, UNIT_ROW_TOL, acc_dtype, as_alpha, as_cosine_scale, check_args,
                         check_unit_rows, cosine_scale_for, int_scalar)
from .fused_fake import fused_fake
from .native import native_available
from ..sizes import DENSE_MAX_K

__all__ = ["haframe_loss", "reference_loss", "paper_loss", "fused_loss", "derive_similarity_or_gram", "as_alpha",
           "as_cosine_scale", "cosine_scale_for", "COSINE_SCALES", "EPS", "UNIT_ROW_TOL"]
# as_alpha, as_cosine_scale, cosine_scale_for, COSINE_SCALES, UNIT_ROW_TOL: defined in fused_args, handed on here

EPS = 1e-8  # norm below which a feature row counts as zero (see module docstring)


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply 'mean' (over non-ignored rows), 'sum' or 'none' to per-row losses."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().to(rows.dtype)


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
    alpha, ignore_index = check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram)
    if similarity is not None and gram is not None:
        raise ValueError("pass at most one of similarity ([K, K]) and gram ([d, d])")
    if gram is not None:
        check_unit_rows(weight)
    weight, similarity, gram = (_usable_in_autograd(t) for t in (weight, similarity, gram))
    acc = acc_dtype(features.dtype)
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
                                               int_scalar(ignore_index), _REDUCTION_CODE[reduction], bool(need_grad))
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
    acc = acc_dtype(dtype)
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
def haframe_loss(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                 alpha: Union[float, torch.Tensor] = 0.4, reduction: str = "mean", ignore_index: int = -100, *,
                 similarity: Optional[torch.Tensor] = None, gram: Optional[torch.Tensor] = None, backend: str = "auto",
                 cosine_scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """HAFrame loss (module docstring); the fused native op on CPU/CUDA, the reference otherwise.

    Pass ``similarity`` or ``gram`` when the loss is called repeatedly (:func:`derive_similarity_or_gram`): without
    them one is derived from the weight's current values on every call, a K x d x K (or d x K x d) product (none at
    alpha = 0 on the CPU, where the op computes the cross entropy alone). The native op computes
    ``t * fused(alpha')`` with ``t = (1 - alpha) + alpha c`` and ``alpha' = alpha c / t``, the same loss and gradient;
    it computes the gradient in the forward pass, so backward only scales it (retain_graph works; double backward
    raises).

    Args:
        features: [B, d], float16/bfloat16/float32/float64 (weight is cast to their dtype).
        weight: [K, d], frozen: the fused op computes no weight gradient (the reference does).
        target: [B] integer labels in [0, K), or ignore_index.
        alpha: the cosine term's weight, a real number in [0, 1] (numpy and 0-dim tensors included).
        reduction: "mean" (over the rows not ignored), "sum" or "none".
        ignore_index: the label of rows that contribute 0; an int.
        similarity: S [K, K] (row y: the target cosines of label y), or None.
        gram: weight.T @ weight [d, d] (unit rows), in place of similarity, or None.
        backend: "auto" (native when available), "native" (error if unavailable) or "reference".
        cosine_scale: the cosine term's multiplier c > 0 (:func:`cosine_scale_for` gives the modules' rule).

    Returns:
        The loss, float32 (float64 for float64 features): a scalar, or [B] with reduction="none".

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or values (one line naming the argument).
        RuntimeError: backend="native" without the compiled extension.
    """
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "native" and not _NATIVE:
        from .native import native_error
        raise RuntimeError(f"backend='native' but the compiled extension is unavailable: {native_error()}")
    use_native = backend != "reference" and _NATIVE
    compiling = torch.compiler.is_compiling()
    alpha, ignore_index = check_args(features, weight, target, alpha, reduction, ignore_index, similarity, gram,
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
    weight, similarity, gram = _native_inputs(features, weight, alpha, similarity, gram, compiling)
    if c == 1.0:
        return fused_loss(features, weight, target, alpha, reduction, ignore_index, similarity=similarity, gram=gram)
    total = (1.0 - alpha) + alpha * c  # > 0, since c > 0
    return total * fused_loss(features, weight, target, alpha * c / total, reduction, ignore_index,
                              similarity=similarity, gram=gram)


def _native_inputs(features: torch.Tensor, weight: torch.Tensor, alpha: float, similarity: Optional[torch.Tensor],
                   gram: Optional[torch.Tensor], compiling: bool):
    """(weight, similarity, gram) as the native op takes them: the weight in the features' dtype, exactly one of S
    [K, K] / G [d, d] in the accumulation dtype, contiguous (S derived from the weight where none was given)."""
    acc = acc_dtype(features.dtype)
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
    return weight, similarity, gram
