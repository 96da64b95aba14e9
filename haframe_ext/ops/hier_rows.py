"""The hierarchical losses' plain-PyTorch formulas: per-row loss and logit gradient over label paths, dense soft
targets, and the chunked reference of the fused linear op (the ground truth for the native kernels)."""

from __future__ import annotations

import torch

__all__ = ["KIND_TELESCOPING", "KIND_SOFT", "acc_dtype", "position_of", "path_rows", "dense_rows", "chunk_rows",
           "reference_hier_op"]

KIND_TELESCOPING, KIND_SOFT = 0, 1  # the op's kinds: HXE-type (CE included) and soft-target
_CHUNK_ELEMENTS = 1 << 21  # logits per chunk on the plain-PyTorch path (~16 MiB in float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a floating dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_of(order: torch.Tensor) -> torch.Tensor:
    """[K] depth-first position of each label, the inverse of order [K]."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))


def path_rows(z, start, end, value, kind: int, position, need_grad: bool):
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
    if kind == KIND_SOFT:
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


def dense_rows(z, q, need_grad: bool):
    """(loss [R], dloss/dz [R, K]) of soft targets q [R, K] given densely (a distance matrix's rows)."""
    lse = torch.logsumexp(z, 1, keepdim=True)
    loss = lse[:, 0] - (q * z).sum(1)
    return loss, (torch.exp(z - lse) - q if need_grad else None)


def chunk_rows(B: int, K: int) -> int:
    """Rows per chunk for B rows of K logits: at least 1, at most B, about _CHUNK_ELEMENTS logits."""
    return max(1, min(max(B, 1), _CHUNK_ELEMENTS // max(K, 1)))


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
    acc = acc_dtype(features.dtype)
    h, W = features.to(acc), weight.to(acc)
    b = None if bias is None else bias.to(acc)
    position = None if order is None else position_of(order)
    rows = torch.empty(B, dtype=acc, device=features.device)
    gh = torch.empty((B, d), dtype=acc, device=features.device) if need_grad else None
    gW = torch.zeros((K, d), dtype=acc, device=features.device) if need_weight_grad else None
    gb = torch.zeros(K, dtype=acc, device=features.device) if need_weight_grad else None
    gscale = (1.0 / B if B else 0.0) if reduction == 1 else 1.0
    step = chunk_rows(B, K)
    for a in range(0, B, step):
        hc = h[a:a + step]
        z = hc @ W.T if b is None else torch.addmm(b, hc, W.T)
        need = need_grad or need_weight_grad
        if dense_q is not None:
            loss, g = dense_rows(z, dense_q[a:a + step].to(acc), need)
        else:
            loss, g = path_rows(z, path_start[a:a + step], path_end[a:a + step], path_value[a:a + step], kind, position,
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
