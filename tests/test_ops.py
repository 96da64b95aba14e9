"""Fused HAFrame loss: parity with the float64 reference on every device, dtype, route and awkward shape."""

import math

import pytest
import torch
import torch.nn.functional as F

import haframe_ext as hx
from haframe_ext import ops
from helpers import make_inputs, reference_loss_and_grad

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (loss rtol/atol, grad atol relative to the largest gradient entry) per dtype, against float64 on the
# same (dtype-rounded) inputs. bf16 on CUDA also rounds the logits and G to bf16 (cuBLAS output).
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2),
       torch.float16: (1e-2, 1e-2)}

needs_native = pytest.mark.skipif(not hx.native_available(), reason="compiled extension not built")

# (B, K, d): B in {1, 7, 256}; K in {2, 3, 100, 1010}; d in {K, K + 5, 3K}; low-dim frames d < K.
SHAPES = [
    (1, 2, 2), (7, 2, 7), (256, 2, 6),
    (1, 3, 3), (7, 3, 8), (256, 3, 9),
    (1, 100, 100), (7, 100, 105), (256, 100, 300),
    (7, 1010, 1010), (256, 1010, 1015), (1, 1010, 3030),
    (7, 100, 40), (64, 1010, 400),
]


def make(B, K, d, dtype, device, seed=0, scale=3.0):
    """Features of norm ~scale, unit-row weights (a frame-like matrix), labels with one ignored row."""
    return make_inputs(B, K, d, dtype, device, seed, scale)


reference = reference_loss_and_grad


def fused(h, w, y, alpha=0.4, reduction="none", ignore_index=-100, grad_out=None, route="auto"):
    """Fused loss and feature gradient, with the route forced where asked."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    kw = {}
    if route == "gather":
        kw["similarity"] = w.to(acc) @ w.to(acc).T
    elif route == "m":
        kw["gram"] = w.to(acc).T @ w.to(acc)
    hh = h.detach().clone().requires_grad_()
    loss = ops.haframe_loss(hh, w, y, alpha, reduction, ignore_index, backend="native", **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
    loss.backward(go)
    return loss.detach(), hh.grad


def assert_match(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    got = got.double().cpu()
    scale = max(1.0, want.abs().max().item()) if what == "grad" else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("route", ["gather", "m"])
def test_parity_with_float64_reference(device, dtype, shape, route):
    h, w, y = make(*shape, dtype, device)
    want_l, want_g = reference(h, w, y)
    got_l, got_g = fused(h, w, y, route=route)
    assert got_l.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got_g.dtype == dtype and got_g.shape == h.shape
    assert_match(got_l, want_l, dtype, "loss")
    assert_match(got_g, want_g, dtype, "grad")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_reductions_ignore_index_and_grad_output(device, reduction, alpha):
    h, w, y = make(37, 50, 55, torch.float64, device, seed=1)
    y[1] = 0
    y[[3, 5, 7]] = 7  # a custom ignore_index shared by several rows
    go = torch.rand(37, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    want_l, want_g = reference(h, w, y, alpha, reduction, ignore_index=7, grad_out=go)
    got_l, got_g = fused(h, w, y, alpha, reduction, ignore_index=7, grad_out=go.to(device))
    assert_match(got_l, want_l, torch.float64, "loss")
    assert_match(got_g, want_g, torch.float64, "grad")
    assert torch.all(got_g[[3, 5, 7]] == 0)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_auto_route_large_k_uses_m_route_and_matches(device):
    h, w, y = make(33, 5000, 64, torch.float32, device, seed=2)
    assert ops.derive_similarity_or_gram(w, torch.float32)[1] is not None  # K > 4096 > d, unit rows: M route
    want_l, want_g = reference(h, w, y, reduction="mean")
    got_l, got_g = fused(h, w, y, reduction="mean")
    assert_match(got_l, want_l, torch.float32, "loss")
    assert_match(got_g, want_g, torch.float32, "grad")


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("B", [33, 500])  # one serial block; two (64 MiB / (20000 * 8 B) = 419 rows)
def test_many_classes_serial_row_blocks_match(reduction, B):
    """K = 20000 in float64: 33 rows fit one 64 MiB block, 500 take two; blocks run one at a time, threads inside.

    The M route only (the gather route's S would be 3 GB here); both routes share the block code.
    """
    route = "m"
    h, w, y = make(B, 20000, 24, torch.float64, "cpu", seed=3)  # 4 MiB / (20000 * 8 B) = 26 rows
    go = torch.rand(B, dtype=torch.float64) + 0.5 if reduction == "none" else None
    want_l, want_g = reference(h, w, y, reduction=reduction, grad_out=go)
    got_l, got_g = fused(h, w, y, reduction=reduction, grad_out=go, route=route)
    assert_match(got_l, want_l, torch.float64, "loss")
    assert_match(got_g, want_g, torch.float64, "grad")
    with torch.no_grad():  # no gradient asked: the same loss
        acc = torch.float64
        kw = {"gram": w.T @ w}
        nograd = ops.haframe_loss(h, w, y, 0.4, reduction, backend="native", **kw)
    assert_match(nograd, want_l, acc, "loss")


# Shapes for the tuned CUDA epilogue (HAFRAME_CUDA_TUNED=1): K, d multiples of the 16-byte vector
# width, a row that stays in registers (K <= 4096), one that is streamed (K > 4096), and a misaligned
# features pointer that must fall back to the generic kernel.
TUNED_SHAPES = [(5, 64, 64), (256, 1024, 512), (9, 4104, 24), (3, 8, 8)]


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("tuned", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape", TUNED_SHAPES, ids=lambda s: "B{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("route", ["gather", "m"])
def test_cuda_tuned_path_parity(monkeypatch, tuned, dtype, shape, route):
    monkeypatch.setenv("HAFRAME_CUDA_TUNED", tuned)
    h, w, y = make(*shape, dtype, "cuda", seed=11)
    if shape[0] > 4:
        h[3] = 0  # a zero row next to the ignored row 1
    want_l, want_g = reference(h, w, y)
    got_l, got_g = fused(h, w, y, route=route)
    assert_match(got_l, want_l, dtype, "loss")
    assert_match(got_g, want_g, dtype, "grad")
    for reduction in ("mean", "sum"):
        want_r, want_rg = reference(h, w, y, reduction=reduction)
        got_r, got_rg = fused(h, w, y, reduction=reduction, route=route)
        assert_match(got_r, want_r, dtype, "loss")
        assert_match(got_rg, want_rg, dtype, "grad")


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("route", ["gather", "m"])
def test_cuda_tuned_path_misaligned_nan_and_no_grad(monkeypatch, route):
    monkeypatch.setenv("HAFRAME_CUDA_TUNED", "1")
    h, w, y = make(6, 64, 64, torch.float32, "cuda", seed=12)
    flat = torch.empty(h.numel() + 1, device="cuda")
    h_off = flat[1:].view_as(h).copy_(h)  # contiguous, but 4 bytes off a 16-byte boundary
    assert h_off.data_ptr() % 16 != 0
    want_l, want_g = reference(h, w, y)
    got_l, got_g = fused(h_off, w, y, route=route)
    assert_match(got_l, want_l, torch.float32, "loss")
    assert_match(got_g, want_g, torch.float32, "grad")
    h[0, 5] = float("nan")
    got_l, got_g = fused(h, w, y, route=route)
    assert torch.isnan(got_l[0]) and torch.isfinite(got_l[2:]).all() and torch.isfinite(got_g[2:]).all()
    with torch.no_grad():
        loss = ops.haframe_loss(h[2:], w, y[2:], reduction="none", backend="native")
    assert_match(loss, got_l[2:].double().cpu(), torch.float32, "loss")


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("tuned", ["0", "1"])
@pytest.mark.parametrize("route", ["gather", "m"])
def test_cuda_graph_capture_replays_loss_and_gradient(monkeypatch, tuned, route):
    """A training step captured whole (forward + backward) and replayed on new data; a bad label inside a
    replay cannot raise (the host never sees it): that replay's mean loss is NaN instead."""
    monkeypatch.setenv("HAFRAME_CUDA_TUNED", tuned)
    h, w, y = make(64, 96, 64, torch.float32, "cuda", seed=9)
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    static_h, static_y = h.clone().requires_grad_(), y.clone()

    def step():
        loss = ops.haframe_loss(static_h, w, static_y, backend="native", **kw)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            static_h.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_h.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    for seed in (3, 4):
        h2, _, y2 = make(64, 96, 64, torch.float32, "cuda", seed=seed)
        with torch.no_grad():
            static_h.copy_(h2)
            static_y.copy_(y2)
        graph.replay()
        torch.cuda.synchronize()
        want_l, want_g = reference(h2, w, y2, reduction="mean")
        assert_match(static_loss.detach(), want_l, torch.float32, "loss")
        assert_match(static_h.grad, want_g, torch.float32, "grad")
    with torch.no_grad():
        static_y[5] = 96  # out of range: no error can reach the host during a replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(static_loss)
    assert torch.isfinite(static_h.grad).all() and torch.all(static_h.grad[5] == 0)


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_graph_capture_without_similarity_or_gram_names_the_fix():
    h, w, y = make(8, 16, 16, torch.float32, "cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="compute it once before capturing"):
        with torch.cuda.graph(graph):
            ops.haframe_loss(h, w, y, backend="native")


def test_bf16_frame_counts_as_unit_and_takes_the_m_route():
    _, w, _ = make(2, 5000, 64, torch.float32, "cpu", seed=2)
    S, M = ops.derive_similarity_or_gram(w, torch.bfloat16)
    assert S is None and M.shape == (64, 64) and M.dtype == torch.float32


@needs_native
def test_huge_similarity_is_refused_with_the_fix_named():
    h = torch.randn(2, 4)
    w = torch.randn(30000, 4) * 3  # rows not unit: would need a 30000 x 30000 S (3.4 GiB)
    with pytest.raises(ValueError, match="normalise the rows"):
        ops.haframe_loss(h, w, torch.tensor([0, 1]), backend="native")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    h, w, y = make(16, 20, 24, torch.float64, device, seed=3)
    h_nc = torch.stack([h, h], dim=2)[:, :, 0]  # strided view equal to h
    w_nc = w.T.contiguous().T  # column-major weight
    y_nc = torch.stack([y, y], dim=1)[:, 0]
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous() and not y_nc.is_contiguous()
    want_l, want_g = reference(h, w, y)
    got_l, got_g = fused(h_nc, w_nc, y_nc)
    assert_match(got_l, want_l, torch.float64, "loss")
    assert_match(got_g, want_g, torch.float64, "grad")


@needs_native
@pytest.mark.parametrize("route", ["gather", "m"])
def test_gradcheck_float64(route):
    h, w, y = make(6, 5, 7, torch.float64, "cpu", seed=4)
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    hh = h.clone().requires_grad_()
    fn = lambda x: ops.haframe_loss(x, w, y, 0.4, "none", backend="native", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hh,))
    fn_mean = lambda x: ops.haframe_loss(x, w, y, 0.4, "mean", backend="native", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn_mean, (hh,))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    h, w, y = make(5, 4, 6, torch.float32, device, seed=5)
    S = w @ w.T
    M = w.T @ w
    for (sim, gram), red in [((S, None), 0), ((None, M), 1), ((S, None), 2)]:
        args = (h.clone().requires_grad_(), w, y, sim, gram, 0.4, -100, red, True)
        # every default check, test_aot_dispatch_dynamic included (tests/test_opcheck.py: generated samples)
        torch.library.opcheck(torch.ops.haframe_ext.fused_loss.default, args)


@needs_native
def test_torch_compile_fullgraph():
    h, w, y = make(8, 10, 12, torch.float32, "cpu", seed=6)
    S = w @ w.T

    def step(x):
        return ops.haframe_loss(x, w, y, 0.4, similarity=S)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = h.clone().requires_grad_()
    x2 = h.clone().requires_grad_()
    l1 = compiled(x1)
    l1.backward()
    l2 = step(x2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_zero_norm_rows_defined(device):
    h, w, y = make(4, 6, 8, torch.float64, device, seed=7)
    h[2] = 0
    got_l, got_g = fused(h, w, y, alpha=0.4)
    want_l, want_g = reference(h, w, y, alpha=0.4)
    assert_match(got_l, want_l, torch.float64, "loss")
    assert_match(got_g, want_g, torch.float64, "grad")
    # documented value: cosines 0 -> cos term sum_k S[k,y]^2, CE of all-zero logits = log K
    S = (w @ w.T).cpu()
    expect = 0.6 * math.log(6) + 0.4 * (S[:, y[2].item()] ** 2).sum().item()
    assert abs(got_l[2].item() - expect) < 1e-9
    # and only the CE gradient: (1 - alpha) W^T (p - e_y) with p uniform
    p = torch.full((6,), 1 / 6, dtype=torch.float64)
    p[y[2].item()] -= 1
    torch.testing.assert_close(got_g[2].cpu(), 0.6 * (w.cpu().T @ p))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_row_gives_nan_loss_not_crash(device, bad):
    h, w, y = make(5, 6, 8, torch.float32, device, seed=8)
    h[0, 3] = bad
    got_l, got_g = fused(h, w, y, reduction="none")
    assert not torch.isfinite(got_l[0])
    assert torch.isfinite(got_l[2:]).all() and torch.isfinite(got_g[2:]).all()
    mean = ops.haframe_loss(h, w, y, backend="native")
    assert not torch.isfinite(mean)


@needs_native
def test_all_rows_ignored_mean_is_nan_sum_is_zero():
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    y[:] = -100
    assert torch.isnan(ops.haframe_loss(h, w, y, backend="native"))
    assert ops.haframe_loss(h, w, y, reduction="sum", backend="native").item() == 0.0


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    h, w, y = make(0, 5, 6, torch.float32, device)
    assert ops.haframe_loss(h, w, y, reduction="none", backend="native").shape == (0,)
    assert ops.haframe_loss(h, w, y, reduction="sum", backend="native").item() == 0.0


@needs_native
def test_retain_graph_and_no_double_backward():
    h, w, y = make(6, 5, 7, torch.float64, "cpu")
    x = h.clone().requires_grad_()
    loss = ops.haframe_loss(x, w, y, backend="native")
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * g1)
    x.grad = None
    loss = ops.haframe_loss(x, w, y, backend="native")
    (g,) = torch.autograd.grad(loss, x, create_graph=False)
    torch.testing.assert_close(g, g1)
    loss = ops.haframe_loss(x, w, y, backend="native")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


@needs_native
def test_no_grad_forward_skips_gradient():
    h, w, y = make(6, 5, 7, torch.float32, "cpu")
    with torch.no_grad():
        loss = ops.haframe_loss(h.requires_grad_(), w, y, backend="native")
    want, _ = reference(h, w, y, reduction="mean")
    assert_match(loss, want, torch.float32, "loss")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_features_with_float32_frame(device):
    h, w, y = make(9, 12, 16, torch.float32, device, seed=9)
    hb = h.to(torch.bfloat16).requires_grad_()
    loss = ops.haframe_loss(hb, w, y, backend="native")  # float32 frame buffer, bf16 features
    assert loss.dtype == torch.float32
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16
    want, _ = reference(hb.detach(), w.to(torch.bfloat16), y, reduction="mean")
    assert_match(loss, want, torch.bfloat16, "loss")


# ----------------------------------------------------------------------------- errors
ERRORS = [
    ("features 3-D", lambda h, w, y: (h[None], w, y), ValueError, "features must be 2-D"),
    ("weight d mismatch", lambda h, w, y: (h, w[:, :-1], y), ValueError, "frame's dimension must equal"),
    ("float labels", lambda h, w, y: (h, w, y.float()), TypeError, "integer class indices"),
    ("label count", lambda h, w, y: (h, w, y[:-1]), ValueError, "one label per row"),
    ("label too big", lambda h, w, y: (h, w, torch.full_like(y, 5)), ValueError, r"target\[0\] = 5 .*\[0, 5\)"),
    ("negative label", lambda h, w, y: (h, w, torch.full_like(y, -1)), ValueError, r"target\[0\] = -1"),
    ("int features", lambda h, w, y: (h.long(), w, y), TypeError, "floating point"),
]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name,mutate,exc,msg", ERRORS, ids=[e[0] for e in ERRORS])
def test_input_errors(backend, name, mutate, exc, msg):
    if backend == "native" and not hx.native_available():
        pytest.skip("compiled extension not built")
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    with pytest.raises(exc, match=msg):
        ops.haframe_loss(*mutate(h, w, y), backend=backend)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range(alpha):
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        ops.haframe_loss(h, w, y, alpha)


def test_bad_reduction_and_backend():
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.haframe_loss(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="backend must be"):
        ops.haframe_loss(h, w, y, backend="cuda")


@needs_native
def test_trainable_weight_is_refused_with_the_fix_named():
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    w = w.clone().requires_grad_()
    with pytest.raises(ValueError, match="fixed frames.*backend='reference'"):
        ops.haframe_loss(h, w, y)
    loss = ops.haframe_loss(h, w, y, backend="reference")
    loss.backward()
    assert w.grad is not None


@needs_native
def test_native_op_checks_labels_itself():
    """The op checks labels on the host even when called directly (never reaches a kernel)."""
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    y[2] = 99
    with pytest.raises(ValueError, match=r"target\[2\] = 99"):
        torch.ops.haframe_ext.fused_loss(h, w, y, w @ w.T, None, 0.4, -100, 0, True)
    with pytest.raises(ValueError, match="exactly one of similarity"):
        torch.ops.haframe_ext.fused_loss(h, w, y.clamp(0, 4), None, None, 0.4, -100, 0, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mismatched_devices():
    h, w, y = make(4, 5, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must be on the same device"):
        ops.haframe_loss(h.cuda(), w, y)


# ----------------------------------------------------------------------------- reference itself
def test_reference_matches_paper_loop_formulation():
    h, w, y = make(12, 9, 11, torch.float64, "cpu", seed=10)
    y[1] = 3  # paper code has no ignore_index
    a = ops.reference_loss(h, w, y, 0.4)
    b = ops.paper_loss(h, w, y, 0.4)
    torch.testing.assert_close(a, b)


def test_reference_gradcheck_and_finite_difference():
    h, w, y = make(5, 4, 6, torch.float64, "cpu", seed=11)
    x = h.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.reference_loss(t, w, y, 0.4, "none"), (x,))
    # central differences on one coordinate, by hand
    eps = 1e-6
    loss = ops.reference_loss(x, w, y, 0.4, "sum")
    (g,) = torch.autograd.grad(loss, x)
    hp, hm = h.clone(), h.clone()
    hp[2, 3] += eps
    hm[2, 3] -= eps
    fd = (ops.reference_loss(hp, w, y, 0.4, "sum") - ops.reference_loss(hm, w, y, 0.4, "sum")) / (2 * eps)
    assert abs(fd.item() - g[2, 3].item()) < 1e-7


def test_frame_similarity_equals_default_target():
    f = hx.HAFrame.from_hierarchy(hx.Hierarchy.builtin("cifar100"), gamma=2.0, dtype=torch.float64)
    h = torch.randn(8, 100, dtype=torch.float64)
    y = torch.randint(0, 100, (8,))
    a = ops.haframe_loss(h, f.weight, y, similarity=f.similarity)
    b = ops.reference_loss(h, f.weight, y)
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- alpha = 0: cross entropy alone
# On the CPU the op then computes no cosine-term quantity (csrc/cpu/fused_loss.cpp, ce_block_epilogue), and the
# bare call derives no S or M: equal to the reference and F.cross_entropy, special rows as at alpha > 0.
A0_ROUTES = ["gather", "m", "bare"]  # similarity=, gram=, neither
A0_DTYPES = [torch.float64, torch.float32]
A0_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# (B, K, d): K = 3 with B = 1 and d = 5; batches with ignored rows; a K above the epilogue's 8 lanes
A0_SHAPES = [(1, 3, 5), (7, 3, 5), (33, 50, 20), (70, 1010, 64)]


def a0_inputs(B, K, d, dtype, seed=0, ignore=True):
    """Unit-row weight (valid for gram=), features of norm ~3, labels with rows 0 and 3 ignored (when B > 3)."""
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    h = (3 * torch.randn(B, d, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    if ignore and B > 3:
        y[[0, 3]] = -100
    return h, w, y


def a0_route_kw(route, w, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wa = w.to(acc)
    return {"gather": {"similarity": wa @ wa.T}, "m": {"gram": wa.T @ wa}, "bare": {}}[route]


def a0_loss_and_grad(h, w, y, backend, reduction="none", **kw):
    hh = h.detach().clone().requires_grad_()
    loss = ops.haframe_loss(hh, w, y, 0.0, reduction, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), hh.grad


def a0_cross_entropy(h, w, y, reduction):
    """F.cross_entropy(h @ W.T, y) in float64 on the same (rounded) inputs, and its feature gradient."""
    hh = h.detach().double().requires_grad_()
    loss = F.cross_entropy(hh @ w.double().T, y, reduction=reduction, ignore_index=-100)
    loss.sum().backward()
    return loss.detach(), hh.grad


@needs_native
@pytest.mark.parametrize("route", A0_ROUTES)
@pytest.mark.parametrize("dtype", A0_DTYPES, ids=str)
@pytest.mark.parametrize("shape", A0_SHAPES, ids=lambda s: "B{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_alpha0_native_equals_reference_and_cross_entropy(route, dtype, shape, reduction):
    h, w, y = a0_inputs(*shape, dtype)
    kw = a0_route_kw(route, w, dtype)
    got_l, got_g = a0_loss_and_grad(h, w, y, "native", reduction, **kw)
    ref_l, ref_g = a0_loss_and_grad(h, w, y, "reference", reduction, **kw)
    ce_l, ce_g = a0_cross_entropy(h, w, y, reduction)
    rtol = A0_RTOL[dtype]
    torch.testing.assert_close(got_l, ref_l, rtol=rtol, atol=0)
    torch.testing.assert_close(got_l.double(), ce_l, rtol=rtol, atol=0)
    gscale = ce_g.abs().max().item()  # entries near 0 are compared at the gradient's own scale
    torch.testing.assert_close(got_g, ref_g, rtol=rtol, atol=rtol * gscale)
    torch.testing.assert_close(got_g.double(), ce_g, rtol=rtol, atol=rtol * gscale)
    if shape[0] > 3:
        assert (got_g[[0, 3]] == 0).all()


@needs_native
@pytest.mark.parametrize("route", A0_ROUTES)
@pytest.mark.parametrize("dtype", A0_DTYPES, ids=str)
def test_alpha0_no_grad_forward_equals_the_forward_with_gradient(route, dtype):
    h, w, y = a0_inputs(33, 50, 20, dtype)
    kw = a0_route_kw(route, w, dtype)
    with torch.no_grad():
        plain = ops.haframe_loss(h, w, y, 0.0, "none", backend="native", **kw)
    assert torch.equal(plain, a0_loss_and_grad(h, w, y, "native", **kw)[0])


@needs_native
@pytest.mark.parametrize("route", A0_ROUTES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_alpha0_gradcheck_float64(route, reduction):
    h, w, y = a0_inputs(6, 3, 5, torch.float64, seed=1)
    kw = a0_route_kw(route, w, torch.float64)
    fn = lambda x: ops.haframe_loss(x, w, y, 0.0, reduction, backend="native", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.clone().requires_grad_(),))


@needs_native
@pytest.mark.parametrize("route", A0_ROUTES)
@pytest.mark.parametrize("dtype", A0_DTYPES, ids=str)
@pytest.mark.parametrize("norm", [0.0, 1e-30, 1e-12])
def test_alpha0_zero_norm_rows_are_log_k_with_the_uniform_gradient(route, dtype, norm):
    h, w, y = a0_inputs(5, 7, 6, dtype, seed=2, ignore=False)
    h[1] = norm
    got_l, got_g = a0_loss_and_grad(h, w, y, "native", **a0_route_kw(route, w, dtype))
    ref_l, ref_g = a0_loss_and_grad(h, w, y, "reference")
    assert got_l[1].item() == pytest.approx(math.log(7), rel=A0_RTOL[dtype])
    torch.testing.assert_close(got_l, ref_l, rtol=A0_RTOL[dtype], atol=0)
    uniform = (w.double().T @ (torch.full((7,), 1 / 7, dtype=torch.float64) - F.one_hot(y[1], 7).double()))
    torch.testing.assert_close(got_g[1].double(), uniform, rtol=A0_RTOL[dtype], atol=A0_RTOL[dtype])
    torch.testing.assert_close(got_g, ref_g, rtol=A0_RTOL[dtype], atol=A0_RTOL[dtype])


@needs_native
@pytest.mark.parametrize("route", A0_ROUTES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_alpha0_nan_and_inf_rows_give_nan_as_at_alpha_above_zero(route, bad):
    """A NaN or Inf feature gives that row a NaN loss and gradient, as at alpha > 0 (its cosines are undefined); the
    other rows are the cross entropy, and sum and mean are NaN."""
    h, w, y = a0_inputs(5, 6, 8, torch.float32, seed=7, ignore=False)
    h[2, 1] = bad
    kw = a0_route_kw(route, w, torch.float32)
    got_l, got_g = a0_loss_and_grad(h, w, y, "native", **kw)
    assert torch.isnan(got_l[2]) and torch.isnan(got_g[2]).all()
    keep = [0, 1, 3, 4]
    ce_l, ce_g = a0_cross_entropy(h[keep], w, y[keep], "none")
    torch.testing.assert_close(got_l[keep].double(), ce_l, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_g[keep].double(), ce_g, rtol=1e-5, atol=1e-6)
    for reduction in ("sum", "mean"):
        assert torch.isnan(ops.haframe_loss(h, w, y, 0.0, reduction, backend="native", **kw))
    assert torch.isnan(ops.haframe_loss(h, w, y, 0.0, "none", backend="reference")[2])


@needs_native
def test_alpha0_an_ignored_nan_row_is_never_read():
    h, w, y = a0_inputs(4, 5, 6, torch.float32, seed=8, ignore=False)
    h[1], y[1] = float("nan"), -100
    for route in A0_ROUTES:
        loss, grad = a0_loss_and_grad(h, w, y, "native", "mean", **a0_route_kw(route, w, torch.float32))
        assert torch.isfinite(loss) and (grad[1] == 0).all() and torch.isfinite(grad).all()


@needs_native
def test_alpha0_nan_in_the_frame_makes_every_row_nan():
    h, w, y = a0_inputs(4, 5, 6, torch.float32, seed=9, ignore=False)
    w[3, 0] = float("nan")
    assert torch.isnan(ops.haframe_loss(h, w, y, 0.0, "none", backend="native", similarity=torch.eye(5))).all()


@needs_native
def test_alpha0_similarity_and_gram_are_not_read_at_alpha_zero():
    """At alpha = 0 the CPU op computes the cross entropy alone: a NaN similarity or gram leaves it finite (the
    reference weighs its NaN cosine term by 0 and gives NaN); a gram with rows that are not unit is still refused."""
    h, w, y = a0_inputs(6, 4, 5, torch.float64, seed=3)
    ce = F.cross_entropy(h @ w.T, y, ignore_index=-100)
    nan_s = torch.full((4, 4), float("nan"), dtype=torch.float64)
    nan_m = torch.full((5, 5), float("nan"), dtype=torch.float64)
    for kw in ({"similarity": nan_s}, {"gram": nan_m}):
        torch.testing.assert_close(ops.haframe_loss(h, w, y, 0.0, backend="native", **kw), ce, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="gram= needs unit rows"):
        ops.haframe_loss(h, 2 * w, y, 0.0, backend="native", gram=nan_m)


@needs_native
def test_alpha0_bare_call_derives_neither_s_nor_m(monkeypatch):
    """haframe_loss(h, W, y, alpha=0) on the CPU computes no W W^T or W^T W: a 30,000-row weight whose S would
    need 6.7 GiB (refused at alpha > 0) gives the cross entropy."""
    def refuse(*args, **kwargs):
        raise AssertionError("derive_similarity_or_gram called at alpha = 0")

    h, w, y = a0_inputs(9, 30000, 4, torch.float64, seed=4)
    w = 2 * w  # rows that are not unit: no M route either
    monkeypatch.setattr(ops, "derive_similarity_or_gram", refuse)
    for c in (1.0, 0.5):  # cosine_scale leaves alpha at 0
        got_l, got_g = a0_loss_and_grad(h, w, y, "native", "mean", cosine_scale=c)
        ce_l, ce_g = a0_cross_entropy(h, w, y, "mean")
        torch.testing.assert_close(got_l, ce_l, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_g, ce_g, rtol=1e-12, atol=1e-12 * ce_g.abs().max().item())


@needs_native
def test_alpha0_compiled_bare_call_equals_eager():
    h, w, y = a0_inputs(7, 3, 5, torch.float32, seed=5)
    fn = torch.compile(lambda x: ops.haframe_loss(x, w, y, 0.0, backend="native"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(h), ops.haframe_loss(h, w, y, 0.0, backend="native"), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("route", ["gather", "m"])
def test_backward_with_grad_output_one_hands_back_the_forward_gradient_safely(reduction, route):
    """loss.backward() on the CPU skips the multiply by 1: the gradient is the same bits as with an explicit
    scale of 1.0 through the multiply, other scales still apply, and a retained graph's second backward is not
    changed by an in-place edit of the first gradient."""
    h, w, y = make(6, 9, 5, torch.float32, "cpu", seed=3)
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}

    def grad_of(scale, retain=False):
        hh = h.detach().clone().requires_grad_()
        loss = ops.haframe_loss(hh, w, y, 0.4, reduction, backend="native", **kw)
        loss.backward(None if scale is None else torch.tensor(scale), retain_graph=retain)
        return hh, loss

    plain = grad_of(None)[0].grad
    torch.testing.assert_close(grad_of(3.0)[0].grad, 3 * plain, rtol=1e-6, atol=0)
    hh, loss = grad_of(None, retain=True)
    first = hh.grad.clone()
    assert torch.equal(first, plain)
    hh.grad.mul_(0)  # an optimizer's in-place zero_
    loss.backward()
    assert torch.equal(hh.grad, first)
