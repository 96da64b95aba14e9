"""The field's baselines: hierarchical cross-entropy (HXE) and soft labels (Bertinetto et al., CVPR 2020), at any K.

With ``p = softmax(z)`` over the K classes and ``p(n)`` the sum of p over the classes under node n:

- **HXE**, label y with root path ``v_0, ..., v_L = y``:
  ``sum_{i=1..L} w(v_i) * -log(p(v_i) / p(v_{i-1}))``, ``w(v) = exp(-alpha depth(v))``, divided by
  ``sum over all nodes n of exp(-alpha depth(n))`` when ``normalize``.  Computed in log space
  (``log p(n) = logsumexp(z[classes under n]) - logsumexp(z)``), so no term underflows.
- **Soft labels**: target ``q_y(c) = softmax_c(-beta d[y, c] / d_max)`` (d under the hierarchy's
  convention), loss ``-sum_c q_y(c) log p_c``, gradient ``p - q_y`` (the KL form's).

Nothing K x K: the classes are ordered depth-first (haframe_ext.hierarchy.ranges), so the ancestors of a
label are L + 1 nested ranges and both losses and their logit gradients are piecewise constant over
the segments between them (the HXE gradient is ``exp(z_c - lse_i) D_i`` on segment i, with
``lse_i`` the logsumexp over range(v_i) and ``D_i = sum_{k <= i} c_k exp(lse_i - lse_k)``,
``c_k = w(v_{k+1}) - w(v_k)``).  Rows are processed in chunks; the fused linear form also never holds
the B x K logits, and returns gradients for the features, a trainable weight and the bias (native op
``haframe_ext::hier_loss`` on CPU/CUDA, the chunked plain-PyTorch path otherwise).  Cross-entropy is
the HXE of the two-node path root -> y with weight 1.
"""

from __future__ import annotations

import math
import numbers
import weakref

import numpy as np
import torch

from ..hierarchy.hierarchy import Hierarchy
from ..hierarchy.ranges import ranges_of
from .native import native_available

__all__ = ["hxe_loss", "soft_label_loss", "linear_hierarchical_loss", "HXELoss", "SoftLabelLoss",
           "LinearHierarchicalLoss", "reference_hier_op", "KINDS"]

KINDS = ("cross-entropy", "hxe", "soft-labels")
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KIND_TELESCOPING, _KIND_SOFT = 0, 1  # the op's kinds: HXE-type (CE included) and soft-target
_CHUNK_ELEMENTS = 1 << 21  # logits per chunk on the plain-PyTorch path (~16 MiB in float64)


# ----------------------------------------------------------------------------- argument checks
def _nonneg(name: str, value) -> float:
    """A finite non-negative real number, or a one-line ValueError naming the problem."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.detach())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}; pass a non-negative number")
    return value


def _check_reduction(reduction) -> int:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_target(target, B: int, K: int) -> torch.Tensor:
    """target as int64 [B], labels checked to lie in [0, K)."""
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool \
            or target.is_complex():
        raise TypeError(f"target must be a tensor of integer class indices (e.g. torch.long), got {target!r:.60}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target must be 1-D with one label per row (B={B}), got shape {tuple(target.shape)}")
    target = target.long()
    if B:
        bad = (target < 0) | (target >= K)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is not a class index: labels must be in [0, {K})")
    return target


def _check_float(name: str, t, dims: int, shape_text: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_text}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape_text}, got shape {tuple(t.shape)}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- what a row needs
class _Spec:
    """The per-row input of a loss kind: the op's kind, the depth-first order, and how to build label paths."""

    def __init__(self, kind: str, K: int, hierarchy=None, *, alpha=0.1, normalize=True, beta=10.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.name, self.K, self.ranges, self.node_value, self.dense_q = kind, K, None, None, None  # ranges: HierRanges
        self._node_value = {}  # device -> node_value as a tensor
        self.op_kind = _KIND_SOFT if kind == "soft-labels" else _KIND_TELESCOPING
        if kind == "cross-entropy":
            return
        if kind == "hxe":
            alpha = _nonneg("alpha", alpha)
            if not isinstance(hierarchy, Hierarchy):
                raise ValueError("HXE needs a tree (a Hierarchy): a distance matrix does not give the ancestors "
                                 "p(v) sums over; build one with Hierarchy.from_edges / from_parents / builtin")
            r = self.ranges = self._ranges(hierarchy, K)
            w = np.exp(-alpha * r.depth.astype(np.float64))  # [n]
            self.node_value = w / w.sum() if normalize else w
        else:
            beta = _nonneg("beta", beta)
            if isinstance(hierarchy, Hierarchy):
                r = self.ranges = self._ranges(hierarchy, K)
                d_max = hierarchy.tree.d_max
                self.node_value = np.exp(-beta * r.level / d_max)  # [n], 1 at the leaves (level 0)
            else:
                from ..hierarchy.distance_matrix import read_distance_matrix
                from ..sizes import DENSE_MAX_K

                if hierarchy is None:
                    raise ValueError("soft labels need a Hierarchy or a [K, K] distance matrix, got None")
                d = np.asarray(read_distance_matrix(hierarchy), dtype=np.float64)
                if d.shape != (K, K):
                    raise ValueError(f"the distance matrix is {d.shape} but there are K={K} classes")
                if K > DENSE_MAX_K:
                    raise ValueError(f"a [K, K] distance matrix at K={K} > {DENSE_MAX_K}: pass a Hierarchy instead, "
                                     "whose tree gives the soft targets without a K x K matrix")
                q = -beta * d / max(float(d.max()), 1e-300)
                q = np.exp(q - q.max(axis=1, keepdims=True))
                self.dense_q = torch.as_tensor(q / q.sum(axis=1, keepdims=True))  # [K, K] float64
                self.op_kind = None  # dense targets: the plain-PyTorch path only

    @staticmethod
    def _ranges(hierarchy: Hierarchy, K: int):
        if hierarchy.num_classes != K:
            raise ValueError(f"the hierarchy has {hierarchy.num_classes} classes but the logits/weight have K={K}")
        return ranges_of(hierarchy)

    def order(self, device):
        """[K] int64 label at each depth-first position, or None for the identity (cross-entropy, dense targets)."""
        if self.ranges is None or self.ranges.identity_order:
            return None
        return self.ranges.tensors(device)["order"]

    def paths(self, target: torch.Tensor):
        """(start, end, value) [B, P] of each row's label path (see HierRanges.paths)."""
        if self.node_value is None:  # cross-entropy: root [0, K) weight 0, then the label, weight 1
            B = target.shape[0]
            start = torch.stack([torch.zeros_like(target), target], 1)
            end = torch.stack([torch.full_like(target, self.K), target + 1], 1)
            value = torch.tensor([0.0, 1.0], dtype=torch.float64, device=target.device).expand(B, 2).contiguous()
            return start, end, value
        key = str(target.device)
        if key not in self._node_value:
            self._node_value[key] = torch.as_tensor(self.node_value).to(target.device)
        return self.ranges.paths(target, self._node_value[key])


_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tree operator -> {arguments: _Spec}


def _make_spec(kind, K, hierarchy, alpha=0.1, normalize=True, beta=10.0) -> _Spec:
    """The _Spec of these arguments, reused across calls for a Hierarchy (a tree's weights cost O(nodes))."""
    if not isinstance(hierarchy, Hierarchy) or isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        return _Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    try:
        key = (kind, K, alpha, bool(normalize), beta)
        hash(key)
    except TypeError:
        return _Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    cache = _SPECS.setdefault(hierarchy.tree, {})
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = _Spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    return cache[key]


# ----------------------------------------------------------------------------- plain-PyTorch row math
def _position(order: torch.Tensor) -> torch.Tensor:
    """[K] depth-first position of each label, the inverse of order [K]."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))


def _rows(z, start, end, value, kind: int, position, need_grad: bool):
    """(loss [R], dloss/dz [R, K] or None) of logit rows z [R, K] (label order) with label paths [R, P]."""
    R, K = z.shape
    P = start.shape[1]
    valid = start >= 0  # [R, P]
    # segment of every class: how many of the ranges v_1..v_L hold its depth-first position
    marks = torch.zeros(R, K + 1, dtype=torch.int64, device=z.device)
    vs = valid[:, 1:]
    marks.scatter_add_(1, torch.where(vs, start[:, 1:], K), vs.long())
    marks.scatter_add_(1, torch.where(vs, end[:, 1:], K), -vs.long())
    seg = marks[:, :K].cumsum(1)  # [R, K] in depth-first order
    if position is not None:
        seg = seg.index_select(1, position)  # [R, K] in label order
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    segmax = torch.full((R, P), float("-inf"), dtype=z.dtype, device=z.device).scatter_reduce(
        1, seg, z, "amax", include_self=True)
    shift = segmax.gather(1, seg)
    ez = torch.exp(torch.where(torch.isfinite(shift), z - shift, neg_inf))
    segsum = torch.zeros((R, P), dtype=z.dtype, device=z.device).scatter_add_(1, seg, ez)
    lseg = torch.where(segsum > 0, segmax + torch.log(segsum), neg_inf)  # [R, P] logsumexp of each segment
    lse = torch.logcumsumexp(lseg.flip(1), 1).flip(1)  # [R, P] logsumexp over range(v_i)
    if kind == _KIND_SOFT:
        size = torch.where(valid, end - start, 0)
        size = size - torch.cat([size[:, 1:], torch.zeros_like(size[:, :1])], 1)  # classes per segment
        f = torch.where(valid, value.to(z.dtype), 0.0)
        qs = f / (f * size).sum(1, keepdim=True)  # [R, P] target probability of each class of segment i
        q = qs.gather(1, seg)  # [R, K]
        loss = lse[:, 0] - (q * z).sum(1)
        grad = torch.exp(z - lse[:, :1]) - q if need_grad else None
        return loss, grad
    w = torch.where(valid, value.to(z.dtype), 0.0)
    w[:, 0] = 0.0
    live = valid[:, 1:]
    step = torch.where(live, lse[:, :-1] - torch.where(live, lse[:, 1:], 0.0), 0.0)  # -log p(v_i) / p(v_{i-1})
    loss = (w[:, 1:] * step).sum(1)
    if not need_grad:
        return loss, None
    c = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], 1) - w  # [R, P]
    D = torch.zeros_like(w)
    D[:, 0] = c[:, 0]
    for i in range(1, P):  # D_i = D_{i-1} exp(lse_i - lse_{i-1}) + c_i along the path
        ratio = torch.where(valid[:, i], torch.exp(lse[:, i] - lse[:, i - 1]), 0.0)
        D[:, i] = D[:, i - 1] * ratio + c[:, i]
    grad = torch.exp(z - lse.gather(1, seg)) * D.gather(1, seg)
    return loss, grad


def _dense_rows(z, q, need_grad: bool):
    """(loss [R], dloss/dz [R, K]) of soft targets q [R, K] given densely (a distance matrix's rows)."""
    lse = torch.logsumexp(z, 1, keepdim=True)
    loss = lse[:, 0] - (q * z).sum(1)
    return loss, (torch.exp(z - lse) - q if need_grad else None)


def _chunk_rows(B: int, K: int) -> int:
    return max(1, min(max(B, 1), _CHUNK_ELEMENTS // max(K, 1)))


# ----------------------------------------------------------------------------- the loss of given logits
class _LogitsLoss(torch.autograd.Function):
    """Loss of logits [B, K] with the logit gradient computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, logits, target, spec, reduction):
        B, K = logits.shape
        acc = _acc(logits.dtype)
        need = logits.requires_grad
        rows = torch.empty(B, dtype=acc, device=logits.device)
        grad = torch.empty((B, K), dtype=logits.dtype, device=logits.device) if need else None
        order = spec.order(logits.device) if spec.dense_q is None else None
        position = None if order is None else _position(order)
        step = _chunk_rows(B, K)
        for a in range(0, B, step):
            z = logits[a:a + step].to(acc)
            t = target[a:a + step]
            if spec.dense_q is not None:
                loss, g = _dense_rows(z, spec.dense_q.to(z.device, acc).index_select(0, t), need)
            else:
                start, end, value = spec.paths(t)
                loss, g = _rows(z, start, end, value, spec.op_kind, position, need)
            rows[a:a + step] = loss
            if need:
                grad[a:a + step] = g.to(logits.dtype)
        ctx.reduction = reduction
        ctx.save_for_backward(grad if need else None)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / B if reduction == "mean" else total

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        if ctx.reduction == "none":
            return grad * go[:, None].to(grad.dtype), None, None, None
        scale = go / grad.shape[0] if ctx.reduction == "mean" else go
        return grad * scale.to(grad.dtype), None, None, None


def _logits_loss(logits, target, spec, reduction):
    _check_float("logits", logits, 2, "[B, K]")
    _check_reduction(reduction)
    target = _check_target(target, logits.shape[0], logits.shape[1])
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}: put them on one device")
    return _LogitsLoss.apply(logits, target, spec, reduction)


def hxe_loss(logits, target, hierarchy, alpha=0.1, normalize=True, reduction="mean"):
    """Hierarchical cross-entropy of logits [B, K] and labels target [B] on a Hierarchy's tree (module docstring)."""
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = _make_spec("hxe", K, hierarchy, alpha=alpha, normalize=normalize)
    return _logits_loss(logits, target, spec, reduction)


def soft_label_loss(logits, target, hierarchy, beta=10.0, reduction="mean"):
    """Soft-label cross-entropy of logits [B, K]: targets softmax(-beta d[y] / d_max) from a Hierarchy or a [K, K]
    distance matrix (small K) (module docstring)."""
    K = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() else 0
    spec = _make_spec("soft-labels", K, hierarchy, beta=beta)
    return _logits_loss(logits, target, spec, reduction)


# ----------------------------------------------------------------------------- the fused linear form
def reference_hier_op(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction,
                      need_grad, need_weight_grad, dense_q=None):
    """Plain-PyTorch twin of the native ``haframe_ext::hier_loss`` op: (loss, d/dfeatures, d/dweight, d/dbias).

    features [B, d], weight [K, d], bias [K] or None, order [K] or None (identity), paths [B, P] (see
    HierRanges.paths; dense_q [B, K] replaces them for a distance matrix's soft targets), row_scale [B] or
    None. Logits are computed in row chunks; gradients are those of the reduced loss, each row scaled by
    row_scale; empty tensors stand for gradients not asked for.
    """
    B, d = features.shape
    K = weight.shape[0]
    acc = _acc(features.dtype)
    h, W = features.to(acc), weight.to(acc)
    b = None if bias is None else bias.to(acc)
    position = None if order is None else _position(order)
    rows = torch.empty(B, dtype=acc, device=features.device)
    gh = torch.empty((B, d), dtype=acc, device=features.device) if need_grad else None
    gW = torch.zeros((K, d), dtype=acc, device=features.device) if need_weight_grad else None
    gb = torch.zeros(K, dtype=acc, device=features.device) if need_weight_grad else None
    gscale = (1.0 / B if B else 0.0) if reduction == 1 else 1.0
    step = _chunk_rows(B, K)
    for a in range(0, B, step):
        hc = h[a:a + step]
        z = hc @ W.T if b is None else torch.addmm(b, hc, W.T)
        need = need_grad or need_weight_grad
        if dense_q is not None:
            loss, g = _dense_rows(z, dense_q[a:a + step].to(acc), need)
        else:
            loss, g = _rows(z, path_start[a:a + step], path_end[a:a + step], path_value[a:a + step], kind, position,
                            need)
        rows[a:a + step] = loss
        if not need:
            continue
        g = g * gscale
        if row_scale is not None:
            g = g * row_scale[a:a + step, None].to(acc)
        if need_grad:
            gh[a:a + step] = g @ W
        if need_weight_grad:
            gW.addmm_(g.T, hc)
            gb += g.sum(0)
    empty = features.new_empty(0)
    loss = rows if reduction == 0 else (rows.sum() / B if reduction == 1 else rows.sum())
    return (loss, empty if gh is None else gh.to(features.dtype), empty if gW is None else gW.to(weight.dtype),
            empty if gb is None else gb.to(weight.dtype))


_NATIVE = native_available() and hasattr(torch.ops.haframe_ext, "hier_loss")


def _hier_fake(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction, need_grad,
               need_weight_grad):
    """Output shapes of haframe_ext::hier_loss for torch.compile / meta tensors."""
    loss = features.new_empty((features.shape[0],) if reduction == 0 else (), dtype=_acc(features.dtype))
    gh = features.new_empty(features.shape if need_grad else (0,))
    gW = weight.new_empty(weight.shape if need_weight_grad else (0,))
    gb = weight.new_empty((weight.shape[0],) if need_weight_grad else (0,))
    return loss, gh, gW, gb


def _hier_setup(ctx, inputs, output):
    (features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction, need_grad,
     need_weight_grad) = inputs
    ctx.reduction, ctx.kind, ctx.has_bias = reduction, kind, bias is not None
    # The inputs, for a second pass: reduction none (per-row scales reach the weight gradient only that way) or a
    # second backward through a retained graph. The forward's gradients are handed over (not copied) by the first.
    ctx.save_for_backward(features, weight, bias, order, path_start, path_end, path_value, row_scale)
    ctx.grads = list(output[1:]) if reduction != 0 else None


def _hier_backward(ctx, g_loss, _gh, _gW, _gb):
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if ctx.grads is not None and (ctx.grads[0].numel() or not want_h) and (ctx.grads[1].numel() or not want_w):
        gh, gW, gb = ctx.grads
        if type(g_loss) is not torch.Tensor:  # traced (fake / functional tensors): out of place
            gh, gW, gb = (t * g_loss.to(t.dtype) if t.numel() else t for t in (gh, gW, gb))
        else:  # eager: handed over and scaled in place; a second backward (retain_graph) recomputes them
            ctx.grads = None
            if not (g_loss.device.type == "cpu" and float(g_loss) == 1.0):
                for t in (gh, gW, gb):
                    if t.numel():
                        t.mul_(g_loss.to(t.dtype))
    else:
        features, weight, bias, order, path_start, path_end, path_value, row_scale = ctx.saved_tensors
        if ctx.reduction == 0:
            scale = g_loss if row_scale is None else g_loss * row_scale
        else:
            scale = g_loss.expand(features.shape[0]) if row_scale is None else g_loss * row_scale
        _, gh, gW, gb = torch.ops.haframe_ext.hier_loss(features, weight, bias, order, path_start, path_end,
                                                         path_value, ctx.kind, scale, ctx.reduction, want_h, want_w)
    pick = lambda t, i: t if ctx.needs_input_grad[i] and t.numel() else None  # noqa: E731
    return (pick(gh, 0), pick(gW, 1), pick(gb, 2) if ctx.has_bias else None) + (None,) * 9


if _NATIVE:
    torch.library.register_fake("haframe_ext::hier_loss")(_hier_fake)
    torch.library.register_autograd("haframe_ext::hier_loss", _hier_backward, setup_context=_hier_setup)


class _ReferenceLinear(torch.autograd.Function):
    """reference_hier_op behind autograd: gradients from the forward pass, scaled by grad_output."""

    @staticmethod
    def forward(ctx, features, weight, bias, order, start, end, value, kind, reduction, dense_q):
        need_h = features.requires_grad
        need_w = weight.requires_grad or (bias is not None and bias.requires_grad)
        first = (need_h, need_w) if reduction != 0 else (False, False)
        loss, gh, gW, gb = reference_hier_op(features, weight, bias, order, start, end, value, kind, None, reduction,
                                             *first, dense_q=dense_q)
        ctx.args = (order, kind, dense_q)
        ctx.reduction, ctx.has_bias = reduction, bias is not None
        ctx.save_for_backward(features, weight, bias, start, end, value, gh, gW, gb)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        features, weight, bias, start, end, value, gh, gW, gb = ctx.saved_tensors
        order, kind, dense_q = ctx.args
        if ctx.reduction == 0:
            want_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            _, gh, gW, gb = reference_hier_op(features, weight, bias, order, start, end, value, kind, g_loss, 0,
                                              ctx.needs_input_grad[0], want_w, dense_q=dense_q)
        else:
            gh, gW, gb = (t * g_loss.to(t.dtype) if t.numel() else t for t in (gh, gW, gb))
        pick = lambda t, i: t if ctx.needs_input_grad[i] and t.numel() else None  # noqa: E731
        return (pick(gh, 0), pick(gW, 1), pick(gb, 2) if ctx.has_bias else None) + (None,) * 7


def _linear(features, weight, target, spec: _Spec, bias, reduction, backend):
    """Check the inputs of the fused form and run the native op or its plain-PyTorch twin."""
    red = _check_reduction(reduction)
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    B, d = features.shape
    K = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight is (K={K}, d={weight.shape[1]}) but features have d={d}: they must agree")
    if bias is not None:
        _check_float("bias", bias, 1, "[K]")
        if bias.shape[0] != K:
            raise ValueError(f"bias must have K={K} entries, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features on {features.device}: put them on one device")
    target = _check_target(target, B, K)
    native = backend != "reference" and _NATIVE and spec.dense_q is None
    if backend == "native" and not native:
        from .native import native_error
        why = "dense distance-matrix targets have no native kernel" if _NATIVE else native_error()
        raise RuntimeError(f"backend='native' is unavailable here: {why}")
    order = None if spec.dense_q is not None else spec.order(features.device)
    if spec.dense_q is not None:
        start = end = value = features.new_empty((B, 0), dtype=torch.int64)
        dense_q = spec.dense_q.to(features.device).index_select(0, target)
    else:
        start, end, value = spec.paths(target)
        dense_q = None
    kind = spec.op_kind if spec.op_kind is not None else _KIND_SOFT
    if not native:
        return _ReferenceLinear.apply(features, weight, bias, order, start, end, value, kind, red, dense_q)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and features.requires_grad and red != 0
    need_w = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)) and red != 0
    weight = weight.to(features.dtype)
    bias = None if bias is None else bias.to(features.dtype)
    loss, _, _, _ = torch.ops.haframe_ext.hier_loss(features, weight, bias, order, start, end, value, kind, None,
                                                    red, need_h, need_w)
    return loss


def linear_hierarchical_loss(features, weight, target, hierarchy=None, kind="cross-entropy", *, alpha=0.1,
                             normalize=True, beta=10.0, bias=None, reduction="mean", backend="auto"):
    """CE, HXE or soft-label loss of the logits ``features [B, d] @ weight [K, d].T + bias [K]``, never B x K at once.

    Gradients flow to features, weight and bias (a trainable classifier). backend: "auto" (native when
    built), "native" or "reference" (the chunked plain-PyTorch path).
    """
    _check_float("features", features, 2, "[B, d]")
    _check_float("weight", weight, 2, "[K, d]")
    spec = _make_spec(kind, weight.shape[0], hierarchy, alpha=alpha, normalize=normalize, beta=beta)
    return _linear(features, weight, target, spec, bias, reduction, backend)


# ----------------------------------------------------------------------------- modules
class HXELoss(torch.nn.Module):
    """Hierarchical cross-entropy of logits (hxe_loss), its tree and weights fixed at construction."""

    def __init__(self, hierarchy, alpha=0.1, normalize=True, reduction="mean"):
        super().__init__()
        self.spec = _make_spec("hxe", hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else -1, hierarchy,
                               alpha=alpha, normalize=normalize)
        self.reduction = reduction
        _check_reduction(reduction)

    def forward(self, logits, target):  # logits [B, K], target [B]
        return _logits_loss(logits, target, self.spec, self.reduction)


class SoftLabelLoss(torch.nn.Module):
    """Soft-label cross-entropy of logits (soft_label_loss), its targets fixed at construction."""

    def __init__(self, hierarchy, beta=10.0, reduction="mean"):
        super().__init__()
        K = hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0])
        self.spec = _make_spec("soft-labels", K, hierarchy, beta=beta)
        self.reduction = reduction
        _check_reduction(reduction)

    def forward(self, logits, target):  # logits [B, K], target [B]
        return _logits_loss(logits, target, self.spec, self.reduction)


class LinearHierarchicalLoss(torch.nn.Module):
    """A trainable linear classifier fused with CE, HXE or soft labels (linear_hierarchical_loss)."""

    def __init__(self, in_features: int, hierarchy, kind="cross-entropy", *, num_classes=None, alpha=0.1,
                 normalize=True, beta=10.0, bias=True, reduction="mean", backend="auto"):
        super().__init__()
        K = num_classes if num_classes is not None else (
            hierarchy.num_classes if isinstance(hierarchy, Hierarchy) else int(np.shape(hierarchy)[0]))
        self.spec = _make_spec(kind, K, hierarchy, alpha=alpha, normalize=normalize, beta=beta)
        self.linear = torch.nn.Linear(in_features, K, bias=bias)
        self.reduction, self.backend = reduction, backend
        _check_reduction(reduction)

    @property
    def weight(self):
        return self.linear.weight

    def logits(self, features):  # features [B, d] -> [B, K]
        """The classifier's logits (for prediction; the loss never builds them whole)."""
        return self.linear(features)

    def forward(self, features, target):  # features [B, d], target [B]
        _check_float("features", features, 2, "[B, d]")
        return _linear(features, self.linear.weight, target, self.spec, self.linear.bias, self.reduction,
                       self.backend)
