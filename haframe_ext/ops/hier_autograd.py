"""The hierarchical losses behind autograd: the loss of given logits, and the fused linear form on the native
``haframe_ext::hier_loss`` op (its fake and autograd registered here) or on its plain-PyTorch twin."""

from __future__ import annotations

import torch

from .hier_rows import KIND_SOFT, acc_dtype, chunk_rows, dense_rows, path_rows, position_of, reference_hier_op
from .hier_spec import Spec, check_float, check_reduction, check_target
from .native import native_available

__all__ = ["NATIVE", "logits_loss", "linear_loss"]


# ----------------------------------------------------------------------------- the loss of given logits
class _LogitsLoss(torch.autograd.Function):
    """Loss of logits [B, K] with the logit gradient computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, logits, target, spec, reduction):
        B, K = logits.shape
        acc = acc_dtype(logits.dtype)
        need = logits.requires_grad
        rows = torch.empty(B, dtype=acc, device=logits.device)
        grad = torch.empty((B, K), dtype=logits.dtype, device=logits.device) if need else None
        order = spec.order(logits.device) if spec.dense_q is None else None
        position = None if order is None else position_of(order)
        step = chunk_rows(B, K)
        for a in range(0, B, step):
            z = logits[a:a + step].to(acc)
            t = target[a:a + step]
            if spec.dense_q is not None:
                loss, g = dense_rows(z, spec.dense_q.to(z.device, acc).index_select(0, t), need)
            else:
                start, end, value = spec.paths(t)
                loss, g = path_rows(z, start, end, value, spec.op_kind, position, need)
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


def logits_loss(logits, target, spec, reduction):
    check_float("logits", logits, 2, "[B, K]")
    check_reduction(reduction)
    target = check_target(target, logits.shape[0], logits.shape[1])
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}: put them on one device")
    return _LogitsLoss.apply(logits, target, spec, reduction)


# ----------------------------------------------------------------------------- the fused linear form
NATIVE = native_available() and hasattr(torch.ops.haframe_ext, "hier_loss")


def _hier_fake(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction, need_grad,
               need_weight_grad):
    """Output shapes of haframe_ext::hier_loss for torch.compile / meta tensors."""
    loss = features.new_empty((features.shape[0],) if reduction == 0 else (), dtype=acc_dtype(features.dtype))
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


if NATIVE:
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


def linear_loss(features, weight, target, spec: Spec, bias, reduction, backend):
    """Check the inputs of the fused form and run the native op or its plain-PyTorch twin."""
    red = check_reduction(reduction)
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    B, d = features.shape
    K = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight is (K={K}, d={weight.shape[1]}) but features have d={d}: they must agree")
    if bias is not None:
        check_float("bias", bias, 1, "[K]")
        if bias.shape[0] != K:
            raise ValueError(f"bias must have K={K} entries, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features on {features.device}: put them on one device")
    target = check_target(target, B, K)
    native = backend != "reference" and NATIVE and spec.dense_q is None
    if backend == "native" and not native:
        from .native import native_error
        why = "dense distance-matrix targets have no native kernel" if NATIVE else native_error()
        raise RuntimeError(f"backend='native' is unavailable here: {why}")
    order = None if spec.dense_q is not None else spec.order(features.device)
    if spec.dense_q is not None:
        start = end = value = features.new_empty((B, 0), dtype=torch.int64)
        dense_q = spec.dense_q.to(features.device).index_select(0, target)
    else:
        start, end, value = spec.paths(target)
        dense_q = None
    kind = spec.op_kind if spec.op_kind is not None else KIND_SOFT
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
