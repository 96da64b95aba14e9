"""Tests for haframe_ext.ops under hostile input: a clear error or a documented, tested result, never a crash.

Extends tests/test_ops.py (a file of its own only to keep each under ~900 lines; test_ops.py covers the basic
shape/label/alpha errors, zero-norm and NaN rows on the gather route, and parity over fixed shapes) with:
every integer label dtype and out-of-range value of both signs, the raw ``torch.ops.haframe_ext.fused_loss``
with wrong similarity/gram/target, meta-device mismatches, empty batches with backward, d = 0, K = 1, the M
route on zero/NaN rows, features scaled far up (the logsumexp must not overflow), bf16 extremes, and a
hypothesis parity check in float64.
Documented results pinned here (see RELIABILITY.md):

* a row with NaN/Inf gives a NaN loss for that row; an *ignored* row with NaN gives 0 and a zero gradient
  on the native backend;
* bf16 features near the bf16 maximum (3.39e38) give a NaN loss (logits overflow float32: inf - inf);
* features whose norm exceeds ~1.8e19 overflow the float32 sum of squares: the row counts as zero-norm
  (cosines 0) exactly as in the float32 reference; the cross-entropy part stays accurate;
* an empty batch gives an empty 'none' loss, 0 for 'sum' and NaN for 'mean' (0/0), as the reference.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haframe_ext as hx
from haframe_ext import ops
from helpers import make_inputs

pytestmark = pytest.mark.skipif(not hx.native_available(), reason="compiled extension not built")
BACKENDS = ["native", "reference"]


def OP(h, w, y, S, M, alpha=0.4, ignore_index=-100, reduction=0, need_grad=True):
    """The raw op: haframe_ext::fused_loss(features, weight, target, similarity, gram, alpha, ignore_index,
    reduction (0 none, 1 mean, 2 sum), need_grad)."""
    return torch.ops.haframe_ext.fused_loss(h, w, y, S, M, alpha, ignore_index, reduction, need_grad)


def make(B=4, K=5, d=6, dtype=torch.float32, seed=0, scale=3.0):
    """The shared loss inputs without an ignored row."""
    return make_inputs(B, K, d, dtype, "cpu", seed, scale, ignore_row=False)


def loss_and_grad(h, w, y, backend, alpha=0.4, reduction="none", ignore_index=-100, **kw):
    """Loss and d(sum loss)/dh for one backend (float64 reference when backend == 'float64')."""
    if backend == "float64":
        h, w, backend = h.double(), w.double(), "reference"
        kw = {k: v.double() for k, v in kw.items()}
    x = h.detach().clone().requires_grad_()
    loss = ops.haframe_loss(x, w, y, alpha, reduction, ignore_index, backend=backend, **kw)
    if loss.numel():
        loss.sum().backward()
    return loss.detach(), x.grad if x.grad is not None else torch.zeros_like(x)


def close(a, b, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)


# ----------------------------------------------------------------------------- labels
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def _bad_labels(dtype, K):
    info = torch.iinfo(dtype)
    vals = [K, K + 1, info.max]
    if info.min < 0:
        vals += [-1, -2, info.min]
    return vals


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_out_of_range_labels_every_int_dtype_both_signs(backend, dtype):
    h, w, _ = make(B=4, K=5)
    for v in _bad_labels(dtype, 5):
        y = torch.tensor([0, 1, v, 2]).to(dtype)
        with pytest.raises(ValueError, match=rf"target\[2\] = {v} is not a class index: labels must be in \[0, 5\)"):
            ops.haframe_loss(h, w, y, backend=backend)


@pytest.mark.parametrize("v", [2**62, -(2**63), 2**63 - 1, 5, -1, -99, -101])
def test_raw_op_checks_int64_extremes_on_the_host(v):
    h, w, _ = make(B=3, K=5)
    y = torch.tensor([0, v, 1])
    for S, M in [(w @ w.T, None), (None, w.T @ w)]:
        with pytest.raises(ValueError, match=rf"target\[1\] = {v} is not a class index"):
            OP(h, w, y, S, M)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES[1:], ids=str)
def test_narrow_int_labels_equal_int64(backend, dtype):
    h, w, _ = make(B=5, K=5, dtype=torch.float64, seed=1)
    y64 = torch.tensor([0, 4, 2, 2, 1])
    want = ops.haframe_loss(h, w, y64, reduction="none", backend=backend)
    got = ops.haframe_loss(h, w, y64.to(dtype), reduction="none", backend=backend)
    close(got, want, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_ignore_index_is_honoured(backend):
    h, w, _ = make(B=3, K=5, dtype=torch.float64)
    y8 = torch.tensor([1, -100, 3], dtype=torch.int8)
    got = ops.haframe_loss(h, w, y8, reduction="none", backend=backend)
    assert got[1] == 0
    close(got, ops.haframe_loss(h, w, y8.long(), reduction="none", backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["bool", "float", "double", "complex", "list", "numpy"])
def test_non_integer_targets_are_type_errors(backend, bad):
    h, w, y = make()
    target = {"bool": y.bool(), "float": y.float(), "double": y.double(), "complex": y.to(torch.complex64),
              "list": y.tolist(), "numpy": y.numpy()}[bad]
    with pytest.raises(TypeError, match="target must"):
        ops.haframe_loss(h, w, target, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64, torch.complex64], ids=str)
def test_raw_op_refuses_non_integer_target(dtype):
    h, w, y = make()
    with pytest.raises(TypeError, match=r"target must hold integer class indices \(e.g. torch.long\), got"):
        OP(h, w, y.to(dtype), w @ w.T, None)


@pytest.mark.parametrize("dtype", INT_DTYPES[1:], ids=str)
def test_raw_op_narrow_int_targets_equal_int64(dtype):
    h, w, _ = make(B=5, K=5, dtype=torch.float64, seed=1)
    y = torch.tensor([0, 4, 2, 2, 1])
    for red in (0, 1, 2):
        want = OP(h, w, y, w @ w.T, None, reduction=red)
        got = OP(h, w, y.to(dtype), w @ w.T, None, reduction=red)
        close(got[0], want[0], 0, 0)
        close(got[1], want[1], 0, 0)
    if dtype != torch.uint8:
        with pytest.raises(ValueError, match=r"target\[1\] = -1 is not a class index"):
            OP(h, w, torch.tensor([0, -1, 2, 2, 1], dtype=dtype), w @ w.T, None)
    with pytest.raises(ValueError, match=r"target\[4\] = 5 is not a class index"):
        OP(h, w, torch.tensor([0, 1, 2, 2, 5], dtype=dtype), w @ w.T, None)


def test_raw_op_refuses_badly_shaped_target():
    h, w, y = make(B=4)
    for t in [y[None], y[:3], y[0], y.repeat(2)]:
        with pytest.raises(ValueError, match="target must be 1-D with one label per row"):
            OP(h, w, t, w @ w.T, None)


@pytest.mark.parametrize("code", [-1, 3, 100])
def test_raw_op_refuses_unknown_reduction_code(code):
    h, w, y = make()
    with pytest.raises(ValueError, match=rf"reduction must be 0 \(none\), 1 \(mean\) or 2 \(sum\), got {code}"):
        OP(h, w, y, w @ w.T, None, reduction=code)


def test_ignore_index_out_of_int64_range_is_an_error_not_a_crash():
    h, w, y = make()
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            ops.haframe_loss(h, w, y, ignore_index=2**70, backend=backend)


def test_float_ignore_index_is_refused_or_agrees_across_backends():
    h, w, _ = make(B=4, K=5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 3])
    out = {}
    for b in BACKENDS:
        try:
            out[b] = ops.haframe_loss(h, w, y, ignore_index=1.5, reduction="none", backend=b)
        except TypeError:
            out[b] = "TypeError"
    if "TypeError" in out.values():
        assert set(out.values()) == {"TypeError"}
    else:
        close(out["native"], out["reference"])


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which,dtype", [("features", torch.int64), ("features", torch.bool),
                                         ("features", torch.complex64), ("weight", torch.int32),
                                         ("weight", torch.complex128), ("features", torch.uint8)])
def test_non_float_features_or_weight_are_type_errors(backend, which, dtype):
    h, w, y = make()
    if which == "features":
        h = h.to(dtype)
    else:
        w = w.to(dtype)
    with pytest.raises(TypeError, match="must be floating point"):
        ops.haframe_loss(h, w, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_features_are_type_errors(backend):
    h, w, y = make()
    for bad in (h.numpy(), h.tolist()):
        with pytest.raises(TypeError, match="features and weight must be torch.Tensor"):
            ops.haframe_loss(bad, w, y, backend=backend)


def test_float16_features_on_cpu_match_the_reference():
    h, w, y = make(B=9, K=7, d=8, dtype=torch.float16, seed=2)
    got_l, got_g = loss_and_grad(h, w, y, "native")
    want_l, want_g = loss_and_grad(h, w, y, "float64")
    assert got_l.dtype == torch.float32 and got_g.dtype == torch.float16
    close(got_l, want_l, 1e-2, 1e-2)
    close(got_g, want_g, 1e-2, 1e-2)


@pytest.mark.parametrize("fdt,wdt", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                     (torch.bfloat16, torch.float32), (torch.float32, torch.int64)])
def test_raw_op_refuses_mixed_feature_and_weight_dtypes(fdt, wdt):
    h, w, y = make()
    with pytest.raises(TypeError, match="features and weight must share one floating point dtype"):
        OP(h.to(fdt), w.to(wdt), y, (w @ w.T).to(torch.float64 if fdt == torch.float64 else torch.float32), None)


@pytest.mark.parametrize("fdt,sdt", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.int64)], ids=str)
@pytest.mark.parametrize("route", ["similarity", "gram"])
def test_raw_op_refuses_wrong_accumulation_dtype_of_similarity_or_gram(fdt, sdt, route):
    h, w, y = make()
    h, w = h.to(fdt), w.to(fdt)
    mat = (w.float() @ w.float().T if route == "similarity" else w.float().T @ w.float()).to(sdt)
    args = (mat, None) if route == "similarity" else (None, mat)
    with pytest.raises(TypeError, match=rf"{route} must be (Float|Double) for \w+ features, got"):
        OP(h, w, y, *args)


def test_haframe_loss_casts_similarity_and_gram_to_the_accumulation_dtype():
    """The public function accepts any float similarity/gram and casts it (the raw op does not)."""
    h, w, y = make(dtype=torch.float32, seed=3)
    want = ops.haframe_loss(h, w, y, backend="native")
    for kw in ({"similarity": (w @ w.T).double()}, {"similarity": (w @ w.T).half()}, {"gram": (w.T @ w).double()}):
        close(ops.haframe_loss(h, w, y, backend="native", **kw), want, 1e-3, 1e-3)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,exc,msg", [
    ("features 1-D", ValueError, "features must be 2-D"),
    ("features 0-D", ValueError, "features must be 2-D"),
    ("weight 1-D", ValueError, "weight must be 2-D"),
    ("weight 3-D", ValueError, "weight must be 2-D"),
    ("weight wider", ValueError, "frame's dimension must equal the feature dimension"),
    ("no classes", ValueError, "at least one class row"),
    ("target 2-D", ValueError, "one label per row"),
    ("target 0-D", ValueError, "one label per row"),
    ("target longer", ValueError, "one label per row"),
    ("similarity K x K+1", ValueError, r"similarity must be \(K, K\) = \(5, 5\), got \(5, 6\)"),
    ("similarity 1-D", ValueError, r"similarity must be \(K, K\)"),
    ("similarity K+1 square", ValueError, r"similarity must be \(K, K\) = \(5, 5\), got \(6, 6\)"),
])
def test_mismatched_shapes(backend, case, exc, msg):
    h, w, y = make(B=4, K=5, d=6)
    S = w @ w.T
    kw = {}
    if case == "features 1-D":
        h = h[0]
    elif case == "features 0-D":
        h = h[0, 0]
    elif case == "weight 1-D":
        w = w[0]
    elif case == "weight 3-D":
        w = w[None]
    elif case == "weight wider":
        w = torch.cat([w, w[:, :1]], dim=1)
    elif case == "no classes":
        w = w[:0]
    elif case == "target 2-D":
        y = y[:, None]
    elif case == "target 0-D":
        y = y[0]
    elif case == "target longer":
        y = torch.cat([y, y])
    elif case == "similarity K x K+1":
        kw["similarity"] = torch.cat([S, S[:, :1]], dim=1)
    elif case == "similarity 1-D":
        kw["similarity"] = S[0]
    elif case == "similarity K+1 square":
        kw["similarity"] = torch.eye(6)
    with pytest.raises(exc, match=msg):
        ops.haframe_loss(h, w, y, backend=backend, **kw)


@pytest.mark.parametrize("gram_shape", [(5, 6), (6, 5), (6,), (7, 7), (1, 1)])
def test_wrong_gram_shape_is_a_clear_error(gram_shape):
    h, w, y = make(B=4, K=5, d=6)
    gram = torch.zeros(gram_shape)
    with pytest.raises(ValueError, match=r"gram must be .*\(6, 6\), got"):
        ops.haframe_loss(h, w, y, gram=gram, backend="native")
    with pytest.raises(ValueError, match=r"gram must be .*\(6, 6\), got"):
        OP(h, w, y, None, gram)


@pytest.mark.parametrize("sim_shape", [(5, 6), (6, 6), (5,), (25,), (1, 5, 5)])
def test_raw_op_wrong_similarity_shape(sim_shape):
    h, w, y = make(B=4, K=5, d=6)
    with pytest.raises(ValueError, match=r"similarity must be \(5, 5\), got shape"):
        OP(h, w, y, torch.zeros(sim_shape), None)


def test_raw_op_needs_exactly_one_of_similarity_and_gram():
    h, w, y = make()
    for S, M in [(None, None), (w @ w.T, w.T @ w)]:
        with pytest.raises(ValueError, match="pass exactly one of similarity"):
            OP(h, w, y, S, M)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-9, 1 + 1e-9])
def test_raw_op_refuses_bad_alpha(bad):
    h, w, y = make()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        OP(h, w, y, w @ w.T, None, bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,exc", [(float("nan"), ValueError), (float("inf"), ValueError), ("0.4x", TypeError),
                                     (None, TypeError), ([0.4], TypeError)])
def test_bad_alpha_values(backend, bad, exc):
    h, w, y = make()
    with pytest.raises(exc, match="alpha must be"):
        ops.haframe_loss(h, w, y, alpha=bad, backend=backend)


def test_raw_op_refuses_a_frame_without_rows():
    h, w, y = make(B=4, K=5, d=6)
    with pytest.raises(ValueError, match="at least one class row"):
        OP(h, w[:0], y, torch.zeros(0, 0), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_dimension_is_cross_entropy_of_zero_logits(backend):
    """d = 0: every row has zero norm and zero logits: loss = (1 - a) log K + a sum_k S[k, y]^2 with S = 0."""
    h, w, y = make(B=3, K=5, d=0)
    loss, grad = loss_and_grad(h, w, y, backend)
    close(loss, torch.full((3,), 0.6 * math.log(5)), 1e-6, 1e-6)
    assert grad.shape == (3, 0)


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["features", "weight", "target"])
def test_mismatched_devices_are_reported(backend, which):
    """'meta' stands in for a second device on a CPU-only machine (tests/test_ops.py covers cuda vs cpu)."""
    h, w, y = make()
    if which == "features":
        h = h.to("meta")
    elif which == "weight":
        w = w.to("meta")
    else:
        y = y.to("meta")
    with pytest.raises(ValueError, match="must be on the same device"):
        ops.haframe_loss(h, w, y, backend=backend)


def test_similarity_on_another_device_is_reported():
    h, w, y = make()
    with pytest.raises(ValueError, match="similarity is on meta, features on cpu"):
        ops.haframe_loss(h, w, y, similarity=(w @ w.T).to("meta"), backend="native")


@pytest.mark.parametrize("which", ["target", "similarity"])
def test_raw_op_with_an_input_on_another_device_raises(which):
    h, w, y = make()
    S = w @ w.T
    if which == "target":
        y = y.to("meta")
    else:
        S = S.to("meta")
    # the C++ op's messages (the fake kernel, which meta tensors reach, raises the same ones)
    with pytest.raises(ValueError, match=r"must be on the same device|similarity is on meta, features on cpu"):
        OP(h, w, y, S, None)


def test_numpy_similarity_gets_a_type_error():
    h, w, y = make()
    with pytest.raises(TypeError, match="similarity must be a torch.Tensor"):
        ops.haframe_loss(h, w, y, similarity=(w @ w.T).numpy(), backend="native")


# ----------------------------------------------------------------------------- empty batch, K = 1
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("route", ["auto", "gather", "m"])
def test_empty_batch_backward_and_reductions(K, route):
    h, w, y = make(B=0, K=K, d=6)
    kw = {"gather": {"similarity": w @ w.T}, "m": {"gram": w.T @ w}, "auto": {}}[route]
    for backend in BACKENDS:
        x = h.clone().requires_grad_()
        none = ops.haframe_loss(x, w, y, reduction="none", backend=backend, **kw)
        assert none.shape == (0,)
        s = ops.haframe_loss(x, w, y, reduction="sum", backend=backend, **kw)
        s.backward()
        assert s.item() == 0.0 and x.grad.shape == (0, 6)
        m = ops.haframe_loss(x, w, y, reduction="mean", backend=backend, **kw)
        assert torch.isnan(m)  # 0 / 0, documented
    loss, g = OP(h, w, y, w @ w.T, None)
    assert loss.shape == (0,) and g.shape == (0, 6)
    assert OP(h, w, y, w @ w.T, None, reduction=2)[0].item() == 0.0
    assert torch.isnan(OP(h, w, y, w @ w.T, None, reduction=1)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 7])
def test_single_class_frame(dtype, B):
    """K = 1: the cross entropy is exactly 0 and the loss is a (cos(w, h) - 1)^2."""
    h, w, y = make(B=B, K=1, d=4, dtype=dtype, seed=4)
    assert (y == 0).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for route in [{}, {"similarity": torch.ones(1, 1, dtype=acc)}, {"gram": w.to(acc).T @ w.to(acc)}]:
        got_l, got_g = loss_and_grad(h, w, y, "native", alpha=0.3, **route)
        want_l, want_g = loss_and_grad(h, w, y, "float64", alpha=0.3)
        cos = F.cosine_similarity(h.double(), w.double().expand(B, -1), dim=1)
        tol = 1e-9 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
        close(got_l, 0.3 * (cos - 1) ** 2, tol, tol)
        close(got_l, want_l, tol, tol)
        close(got_g, want_g, tol, tol)



# ----------------------------------------------------------------------------- zero norm, NaN, Inf
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("row_scale", [0.0, 1e-30, 1e-12])
def test_zero_and_sub_eps_norm_rows_on_both_routes(route, row_scale):
    """Rows with ||h|| <= EPS = 1e-8 count as zero: cosines 0, no cosine gradient; same as the reference."""
    h, w, y = make(B=5, K=6, d=8, dtype=torch.float64, seed=5)
    h[1] *= row_scale / h[1].norm()
    h[3] = 0
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    got_l, got_g = loss_and_grad(h, w, y, "native", **kw)
    want_l, want_g = loss_and_grad(h, w, y, "float64")
    close(got_l, want_l)
    close(got_g, want_g)
    S = w @ w.T
    for r in (1, 3):
        # logits are ~0 (|z| <= 1e-12), so the CE is log K to within 1e-12
        expect = 0.6 * math.log(6) + 0.4 * (S[:, y[r]] ** 2).sum().item()
        assert abs(got_l[r].item() - expect) < 1e-9


def test_all_rows_zero_and_rows_just_above_eps():
    h, w, y = make(B=4, K=5, d=6, dtype=torch.float64, seed=6)
    zero = torch.zeros_like(h)
    close(loss_and_grad(zero, w, y, "native")[0], loss_and_grad(zero, w, y, "float64")[0])
    above = h / h.norm(dim=1, keepdim=True) * 1e-6  # 100x EPS: cosines are computed
    got_l, got_g = loss_and_grad(above, w, y, "native")
    want_l, want_g = loss_and_grad(above, w, y, "float64")
    close(got_l, want_l)
    close(got_g, want_g, 1e-7, 1e-7)  # gradients scale like 1 / ||h|| = 1e6


@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_rows_on_both_routes(route, bad):
    h, w, y = make(B=5, K=6, d=8, seed=7)
    h[2, 1] = bad
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    got_l, got_g = loss_and_grad(h, w, y, "native", **kw)
    assert not torch.isfinite(got_l[2])
    keep = [0, 1, 3, 4]
    assert torch.isfinite(got_l[keep]).all() and torch.isfinite(got_g[keep]).all()
    want_l, _ = loss_and_grad(h, w, y, "float64")
    close(got_l[keep], want_l[keep], 1e-5, 1e-5)


def test_ignored_nan_row_is_zero_on_the_native_backend():
    """An ignored row is never read: its loss and gradient are 0 even if it holds NaN (native backend)."""
    h, w, y = make(B=4, K=5, d=6, seed=8)
    h[1] = float("nan")
    y[1] = -100
    for kw in ({"similarity": w @ w.T}, {"gram": w.T @ w}):
        loss, grad = loss_and_grad(h, w, y, "native", reduction="mean", **kw)
        assert torch.isfinite(loss)
        assert (grad[1] == 0).all() and torch.isfinite(grad).all()
    # the reference's forward agrees (its backward may propagate NaN through torch.where, as PyTorch does)
    close(ops.haframe_loss(h, w, y, backend="native"), ops.haframe_loss(h, w, y, backend="reference"), 1e-5, 1e-5)


def test_nan_in_the_frame_makes_every_row_nan_without_crashing():
    h, w, y = make(B=4, K=5, d=6, seed=9)
    w[3, 0] = float("nan")
    for backend in BACKENDS:
        loss = ops.haframe_loss(h, w, y, reduction="none", backend=backend)
        assert torch.isnan(loss).all()


# ----------------------------------------------------------------------------- huge logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("scale", [1e4, 1e8, 1e12])
def test_features_scaled_far_up_stay_finite_and_match_float64(dtype, route, scale):
    """Logits of 1e4..1e12: the max-shifted logsumexp must not overflow; compare with the float64 reference."""
    h, w, y = make(B=16, K=50, d=64, dtype=torch.float64, seed=10)
    h = (h * scale).to(dtype)
    w = w.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kw = {"similarity": (w.to(acc) @ w.to(acc).T)} if route == "gather" else {"gram": w.to(acc).T @ w.to(acc)}
    got_l, got_g = loss_and_grad(h, w, y, "native", **kw)
    want_l, want_g = loss_and_grad(h, w, y, "float64")
    assert torch.isfinite(got_l).all() and torch.isfinite(got_g).all()
    assert (got_l > scale * 1e-3).any()  # the loss really is huge
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    close(got_l, want_l, rtol, 0)
    # gradient: CE part = W^T (p - e_y), bounded by ~2; compare on the scale of the largest entry
    gs = max(1.0, want_g.abs().max().item())
    close(got_g, want_g, 0, (1e-9 if dtype == torch.float64 else 1e-4) * gs)


@pytest.mark.parametrize("scale", [1e4, 1e12, 1e18])
def test_cosine_term_alone_at_large_scale_matches_float64(scale):
    """alpha = 1 isolates the cosine term, which must not lose accuracy while ||h||^2 fits in float32."""
    h, w, y = make(B=8, K=20, d=32, dtype=torch.float64, seed=11)
    h = (h / h.norm(dim=1, keepdim=True) * scale).float()
    got, _ = loss_and_grad(h, w.float(), y, "native", alpha=1.0)
    want, _ = loss_and_grad(h, w.float(), y, "float64", alpha=1.0)
    close(got, want, 1e-5, 1e-5)


def test_float32_norm_overflow_is_the_documented_zero_row_behaviour():
    """||h|| > ~1.8e19: ||h||^2 overflows float32, the row counts as zero-norm (cosines 0) as in the float32
    reference; the CE part stays right.  float64 features do not have this limit."""
    h, w, y = make(B=6, K=10, d=16, dtype=torch.float64, seed=12)
    h = h / h.norm(dim=1, keepdim=True) * 1e20
    native, _ = loss_and_grad(h.float(), w.float(), y, "native", alpha=1.0)
    ref32 = ops.haframe_loss(h.float(), w.float(), y, 1.0, "none", backend="reference")
    S = (w @ w.T).float()
    zero_row = (S[:, y] ** 2).sum(0)  # the documented value: sum_k S[k, y]^2
    close(native, ref32, 1e-5, 1e-5)
    close(native, zero_row, 1e-5, 1e-5)
    # float64 features: exact
    got64, _ = loss_and_grad(h, w, y, "native", alpha=1.0)
    want64, _ = loss_and_grad(h, w, y, "float64", alpha=1.0)
    close(got64, want64, 1e-9, 1e-9)
    # the CE part (alpha = 0) is still accurate in float32
    ce, _ = loss_and_grad(h.float(), w.float(), y, "native", alpha=0.0)
    ce64, _ = loss_and_grad(h, w, y, "float64", alpha=0.0)
    close(ce, ce64, 2e-6, 0)


# ----------------------------------------------------------------------------- bf16 extremes
BF16_MAX = torch.finfo(torch.bfloat16).max  # 3.39e38


@pytest.mark.parametrize("K,B", [(1, 1), (5, 3)])
def test_bf16_near_max_gives_a_nan_loss_not_a_crash(K, B):
    """Features at +bf16 max: logits overflow float32 to +inf, lse - z_y = inf - inf = NaN (documented)."""
    g = torch.Generator().manual_seed(13)
    h = torch.full((B, 8), BF16_MAX, dtype=torch.bfloat16)
    w = F.normalize(torch.rand(K, 8, generator=g) + 0.1, dim=1).to(torch.bfloat16)  # positive: z -> +inf
    y = torch.zeros(B, dtype=torch.long)
    got_l, got_g = loss_and_grad(h, w, y, "native")
    ref = ops.haframe_loss(h, w, y, reduction="none", backend="reference")
    assert got_l.shape == (B,) and got_g.shape == (B, 8) and got_g.dtype == torch.bfloat16
    assert torch.isnan(got_l).all() and torch.isnan(ref).all()
    assert torch.isnan(ops.haframe_loss(h, w, y, backend="native"))


@pytest.mark.parametrize("value", [-BF16_MAX, 1e30, 1e-38, 1e-40])
def test_bf16_extreme_magnitudes_match_the_bf16_reference(value):
    """Other extremes (negative max, 1e30, tiny and subnormal): native equals the reference run on the same
    bf16 inputs with float32 accumulation; no crash.  (Subnormal rows count as zero-norm.)"""
    for K, B in [(1, 1), (5, 3)]:
        g = torch.Generator().manual_seed(14)
        h = torch.full((B, 8), value, dtype=torch.bfloat16)
        w = F.normalize(torch.randn(K, 8, generator=g), dim=1).to(torch.bfloat16)
        y = torch.arange(B) % K
        got = ops.haframe_loss(h, w, y, reduction="none", backend="native")
        want = ops.haframe_loss(h, w, y, reduction="none", backend="reference")
        close(got, want, 1e-3, 1e-3)


# ----------------------------------------------------------------------------- property: fused == reference
@st.composite
def loss_cases(draw):
    B = draw(st.integers(0, 12))
    K = draw(st.integers(1, 24))
    d = draw(st.integers(1, 24))
    route = draw(st.sampled_from(["auto", "gather", "m", "custom_S"]))
    unit = route == "m" or draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e3]))
    alpha = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    ignore_index = draw(st.sampled_from([-100, -1, 0, K - 1]))
    mask = draw(st.lists(st.booleans(), min_size=B, max_size=B))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return B, K, d, route, unit, seed, scale, alpha, ignore_index, mask, reduction


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(loss_cases())
def test_fused_equals_reference_in_float64(case):
    B, K, d, route, unit, seed, scale, alpha, ignore_index, mask, reduction = case
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(K, d, generator=g, dtype=torch.float64)
    if unit:
        w = F.normalize(w, dim=1)
    y = torch.randint(0, K, (B,), generator=g)
    y[torch.tensor(mask, dtype=torch.bool)] = ignore_index
    kw = {}
    if route == "gather":
        kw["similarity"] = w @ w.T
    elif route == "m":
        kw["gram"] = w.T @ w
    elif route == "custom_S":  # any target, not W W^T, symmetric or not: the gather route uses it as given
        A = torch.rand(K, K, generator=g, dtype=torch.float64) * 2 - 1
        kw["similarity"] = A if seed % 2 else (A + A.T) / 2
    got_l, got_g = loss_and_grad(h, w, y, "native", alpha, reduction, ignore_index, **kw)
    want_l, want_g = loss_and_grad(h, w, y, "reference", alpha, reduction, ignore_index,
                                   **({"similarity": kw["similarity"]} if route == "custom_S" else {}))
    assert got_l.shape == want_l.shape and got_g.shape == h.shape
    close(got_l, want_l, 1e-9, 1e-9)
    gs = max(1.0, want_g[torch.isfinite(want_g)].abs().max().item() if want_g.numel() else 1.0)
    torch.testing.assert_close(got_g, want_g, rtol=1e-8, atol=1e-9 * gs, equal_nan=True)
    if B and reduction != "mean":
        ignored = y == ignore_index
        assert (got_l[ignored] == 0).all() if reduction == "none" else True
        assert (got_g[ignored] == 0).all()


# ----------------------------------------------------------------------------- no crash, in a subprocess
FUZZ = textwrap.dedent("""
    import random, torch, haframe_ext
    op = torch.ops.haframe_ext.fused_loss
    rnd = random.Random(1234)
    dts = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8]
    calls = errors = 0
    for it in range(400):
        B, K, d = rnd.choice([0, 1, 3]), rnd.choice([0, 1, 4]), rnd.choice([0, 1, 5])
        def t(shape, dt):
            x = torch.randn(shape) * rnd.choice([0.0, 1.0, 1e30, float('nan')])
            return x.to(dt) if dt.is_floating_point else x.abs().to(dt)
        fd, wd = rnd.choice(dts), rnd.choice(dts)
        h = t((B, d) if rnd.random() < .8 else (B,), fd)
        w = t((K, d) if rnd.random() < .8 else (K, d + 1), wd)
        y = torch.tensor([rnd.choice([-2**63, -100, -1, 0, 1, 3, 2**62]) for _ in range(B)], dtype=torch.int64)
        if rnd.random() < .2:
            y = y.to(rnd.choice([torch.int32, torch.uint8, torch.float32]))
        sdt = rnd.choice([torch.float32, torch.float64, torch.float16])
        S = torch.randn(rnd.choice([K, K + 1]), rnd.choice([K, 2])).to(sdt) if rnd.random() < .5 else None
        M = torch.randn(rnd.choice([d, 2]), d).to(sdt) if (S is None) == (rnd.random() < .8) else None
        alpha = rnd.choice([0.0, 0.4, 1.0, -1.0, float('nan')])
        calls += 1
        try:
            loss, grad = op(h, w, y, S, M, alpha, rnd.choice([-100, 0, 1]), rnd.choice([0, 1, 2, 3]),
                            rnd.random() < .5)
            loss.sum().item()
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            errors += 1
            assert str(e).strip()
    print("calls", calls, "errors", errors)
""")


def test_randomised_hostile_raw_op_calls_never_crash_the_process():
    """400 random (mostly invalid) raw-op calls in a child process: a segfault/abort shows up as a signal."""
    r = subprocess.run([sys.executable, "-c", FUZZ], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}"
    assert "calls 400" in r.stdout


# ----------------------------------------------------------------------------- round 2: stale derived matrices
def _write(kind, w, new):
    """Overwrite the weight w with new by one of the ways that do not bump w._version."""
    if kind == "data_copy":
        w.data.copy_(new)
    elif kind == "data_assign":
        w.data = new.clone()
    elif kind == "numpy_view":
        w.numpy()[...] = new.numpy()
    else:  # an ordinary in-place write, which bumps the version
        with torch.no_grad():
            w.copy_(new)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("K,d", [(5, 6), (1, 3), (4200, 16)], ids=["K5-d6", "K1-d3", "K4200-d16-mroute"])
@pytest.mark.parametrize("kind", ["data_copy", "data_assign", "numpy_view", "inplace"])
def test_default_call_follows_every_write_to_the_weight(dtype, K, d, kind):
    """haframe_loss(h, W, y) derives S (or M) from W's current values: `.data` writes and numpy views
    included (the op used to serve a cached S keyed on id and _version: 2.3868 against 2.2613)."""
    h, w, y = make(B=7, K=K, d=d, dtype=dtype, seed=1)
    _, w2, _ = make(B=7, K=K, d=d, dtype=dtype, seed=2)
    first = ops.haframe_loss(h, w, y, backend="native")
    _write(kind, w, w2)
    got = ops.haframe_loss(h, w, y, backend="native")
    want = ops.haframe_loss(h, w2, y, backend="reference")
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    close(got, want, tol, tol)
    assert not torch.equal(first, got)


@pytest.mark.parametrize("K,d", [(777, 8), (4321, 12)], ids=["gather", "mroute"])
def test_default_call_keeps_nothing_alive_after_the_weight_dies(K, d):
    """No derived S [K, K] or M [d, d] (nor the weight itself) outlives the call (the cache kept an
    858 MB S after `del W`)."""
    import gc
    h, w, y = make(B=3, K=K, d=d, dtype=torch.float32, seed=3)
    ops.haframe_loss(h, w, y, backend="native")
    del w
    gc.collect()
    live = [tuple(t.shape) for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)]
    assert (K, K) not in live and (d, d) not in live and (K, d) not in live


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
@pytest.mark.parametrize("route", ["auto", "similarity", "gram"])
def test_weight_made_under_inference_mode(backend, route):
    """A frame built under torch.inference_mode() trains features like any other weight (the default
    backend raised 'Inference tensors do not track version counter')."""
    h, w64, y = make(B=6, K=5, d=7, dtype=torch.float64, seed=4)
    with torch.inference_mode():
        w = w64.clone()
        kw = {"auto": {}, "similarity": {"similarity": w @ w.T}, "gram": {"gram": w.T @ w}}[route]
    assert w.is_inference()
    got_l, got_g = loss_and_grad(h, w, y, backend if backend != "auto" else "native", **kw)
    want_l, want_g = loss_and_grad(h, w64, y, "reference")
    close(got_l, want_l)
    close(got_g, want_g)


# ----------------------------------------------------------------------------- round 2: what similarity and gram mean
def _rowwise_target_loss(h, w, y, S, alpha=0.4):
    """Per-row loss by hand: (1 - a) CE + a sum_k (cos(w_k, h) - S[y, k])^2 (row y of S is label y's target)."""
    out = []
    for b in range(h.shape[0]):
        z = w @ h[b]
        ce = torch.logsumexp(z, 0) - z[y[b]]
        cos = z / (w.norm(dim=1) * h[b].norm())
        out.append((1 - alpha) * ce + alpha * ((cos - S[y[b]]) ** 2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,K,d", [(1, 2, 2), (7, 5, 6), (33, 40, 9)])
def test_asymmetric_similarity_means_row_y_on_both_backends(backend, dtype, B, K, d):
    """similarity[y] is the target row of label y: an asymmetric S gives the same loss on both backends
    (2.73 against 1.11 before), and swapping S[:, y] for S[y, :] in either one fails here."""
    h, w, y = make(B=B, K=K, d=d, dtype=dtype, seed=5)
    S = torch.triu(torch.rand(K, K, generator=torch.Generator().manual_seed(6), dtype=torch.float64)) * 2 - 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got, _ = loss_and_grad(h, w, y, backend, similarity=S.to(acc))
    want = _rowwise_target_loss(h.double(), w.double(), y, S.to(acc).double())
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    close(got, want, tol, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [2.0, 0.5, 1.02])
def test_gram_for_rows_that_are_not_unit_is_refused_on_both_backends(backend, scale):
    """gram= stands for weight^T weight of unit rows; other rows are refused with the fix named (they gave
    9.593 against 8.654)."""
    h, w, y = make(B=4, K=5, d=6, dtype=torch.float64, seed=7)
    w = w * scale
    with pytest.raises(ValueError, match="gram= needs unit rows.*pass similarity="):
        ops.haframe_loss(h, w, y, gram=w.T @ w, backend=backend)


def test_raw_op_refuses_gram_with_rows_that_are_not_unit():
    h, w, y = make(B=4, K=5, d=6)
    with pytest.raises(ValueError, match="gram= needs unit rows"):
        OP(h, 3 * w, y, None, 9 * w.T @ w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gram_accepts_rows_unit_up_to_rounding_and_both_backends_agree(backend, dtype):
    """Rows normalised in float64 and rounded to the features' dtype pass; any gram (not only W^T W) means
    the cosine term u^T G u, u = h / ||h|| - w_y, on both backends."""
    h, w, y = make(B=9, K=30, d=8, dtype=dtype, seed=8)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    G = torch.eye(8, dtype=acc) * 0.7
    got, _ = loss_and_grad(h, w, y, backend, gram=G)
    want, _ = loss_and_grad(h, w, y, "native" if backend == "reference" else "reference", gram=G)
    tol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 2e-2)
    close(got, want, tol, tol)


# ----------------------------------------------------------------------------- round 2: scalar arguments
NOT_NUMBERS = ["0.3", b"0.3", np.str_("0.3"), __import__("decimal").Decimal("0.3"), True, False, 0.3 + 0j, None, [0.3]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", NOT_NUMBERS, ids=repr)
def test_alpha_that_is_not_a_real_number_is_refused_on_both_backends(backend, bad):
    """alpha="0.3" ran on the native backend and failed inside the reference; both now refuse it."""
    h, w, y = make()
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.haframe_loss(h, w, y, alpha=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [np.float32(0.3), np.float64(0.3), np.int64(1), torch.tensor(0.3),
                                   torch.tensor(0.3, dtype=torch.float64, requires_grad=True), torch.tensor(1),
                                   __import__("fractions").Fraction(3, 10), 0, 1],
                         ids=lambda a: f"{type(a).__name__}({a!r})")
def test_alpha_as_any_real_scalar_gives_the_float_result(backend, alpha):
    h, w, y = make(dtype=torch.float64)
    got = ops.haframe_loss(h, w, y, alpha=alpha, reduction="none", backend=backend)
    plain = alpha.item() if isinstance(alpha, torch.Tensor) else float(alpha)
    want = ops.haframe_loss(h, w, y, alpha=plain, reduction="none", backend="reference")
    assert not got.requires_grad and got.dtype == torch.float64
    close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [True, "1", 1.0, torch.tensor(1.0), np.float64(1.0)], ids=repr)
def test_ignore_index_that_is_not_an_integer_is_refused_on_both_backends(backend, bad):
    h, w, y = make()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ops.haframe_loss(h, w, y, ignore_index=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ii", [np.int64(1), np.int8(1), torch.tensor(1), torch.tensor(1, dtype=torch.uint8)],
                         ids=repr)
def test_ignore_index_as_an_integer_scalar_agrees(backend, ii):
    h, w, _ = make(dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 3])
    got = ops.haframe_loss(h, w, y, ignore_index=ii, reduction="none", backend=backend)
    want = ops.haframe_loss(h, w, y, ignore_index=1, reduction="none", backend="reference")
    close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which,dtype", [("similarity", torch.complex64), ("gram", torch.complex128),
                                         ("similarity", torch.bool)], ids=str)
def test_complex_or_bool_similarity_and_gram_are_refused_on_both_backends(backend, which, dtype):
    """They were cast silently (complex dropping its imaginary part with a warning)."""
    h, w, y = make()
    n = 5 if which == "similarity" else 6
    with pytest.raises(TypeError, match=f"{which} must be real .floating point"):
        ops.haframe_loss(h, w, y, backend=backend, **{which: torch.eye(n).to(dtype)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_and_gram_together_are_refused_on_both_backends(backend):
    """The native backend used the similarity and dropped the gram silently; the reference ignored the gram."""
    h, w, y = make()
    with pytest.raises(ValueError, match="one of similarity"):
        ops.haframe_loss(h, w, y, similarity=w @ w.T, gram=w.T @ w, backend=backend)


def test_a_non_symmetric_gram_gives_the_gradient_of_its_loss():
    """Issue 22 item 11: the kernels' gradient 2 G u holds for a symmetric G only; a non-symmetric gram= is
    symmetrised in the Python entry (u^T G u is unchanged), so gradcheck passes on every backend and the native
    loss and gradient equal the reference's."""
    g = torch.Generator().manual_seed(0)
    K, d, B = 40, 8, 6
    w = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    G = torch.randn(d, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    h = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    for backend in ("auto", "reference"):
        assert torch.autograd.gradcheck(lambda x: ops.haframe_loss(x, w, y, 0.4, "mean", gram=G, backend=backend),
                                        (h,))
    ref = h.detach().clone().requires_grad_()
    ops.reference_loss(ref, w, y, 0.4, "sum", gram=G).backward()
    loss = ops.haframe_loss(h, w, y, 0.4, "sum", gram=G)
    loss.backward()
    assert torch.allclose(loss, ops.reference_loss(ref.detach(), w, y, 0.4, "sum", gram=G), rtol=1e-12)
    assert torch.allclose(h.grad, ref.grad, rtol=1e-10, atol=1e-12)
