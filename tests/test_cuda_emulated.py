"""The CUDA kernels of the fused loss, executed on the CPU by tests/cuda_emu, against the float64 reference.

Without a GPU these tests are what runs the CUDA kernel code (index math, vector loads, the row kept in
registers or streamed, block reductions, ignored / zero / NaN rows, row chunks) on every machine; the
default and the tuned (HAFRAME_CUDA_TUNED=1) host paths are both replayed. Timing, races and cuBLAS are not
emulated: tests/test_ops.py on a GPU covers them (bench/gpu_check.sh).
"""

import ctypes
import shutil

import pytest
import torch

from haframe_ext import ops
from helpers import make_inputs

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CPU emulator")

E = pytest.importorskip("cuda_emu.emulated")

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2),
       torch.float16: (1e-2, 1e-2)}
# (B, K, d): tiny and odd (generic kernels only), vector-eligible with the row in registers, float32-only
# vector shapes, K = 4096 (the longest row kept in registers: every thread's every register slot used)
# and K > 4096 (rows streamed by 1024-thread blocks)
SHAPES = [(1, 2, 2), (7, 3, 8), (5, 64, 64), (9, 100, 40), (3, 4096, 16), (4, 4104, 16)]


@pytest.fixture(scope="module", autouse=True)
def emulator():
    E.lib()


def make(B, K, d, dtype, seed=0):
    """The shared loss inputs (unit-row frame, one ignored row) on the CPU, plus a zero feature row when B > 4."""
    h, w, y = make_inputs(B, K, d, dtype, "cpu", seed)
    if B > 4:
        h[3] = 0
    return h, w, y


def route_kw(w, dtype, route):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wa = w.to(acc)
    return {"similarity": wa @ wa.T} if route == "gather" else {"gram": (wa.T @ wa).contiguous()}


def reference(h, w, y, reduction="none", ignore_index=-100, alpha=0.4):
    h64 = h.detach().double().clone().requires_grad_()
    loss = ops.reference_loss(h64, w.double(), y, alpha, reduction, ignore_index)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), h64.grad


def assert_match(got, want, dtype, what, grad_scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * grad_scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def vec_taken(h, w, dtype, route):
    """Whether the tuned host path picks the vector epilogue for these (contiguous, fresh) buffers."""
    ptrs = (ctypes.c_void_p * 3)(h.data_ptr(), w.data_ptr(), h.data_ptr())
    return bool(E.lib().emu_vec_supported(ctypes.c_int64(w.shape[0]), ctypes.c_int64(h.shape[1]),
                                          ctypes.c_int(h.element_size()), ptrs, 3))


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-d{}".format(*s))
@pytest.mark.parametrize("route", ["gather", "m"])
def test_emulated_kernels_match_float64_reference(tuned, dtype, shape, route):
    if shape[1] >= 4096 and dtype in (torch.float64, torch.float16):
        pytest.skip("the long-row cases run for float32 and bfloat16 (emulation time)")
    h, w, y = make(*shape, dtype)
    want_l, want_g = reference(h, w, y)
    got_l, got_g = E.fused_loss(h, w, y, alpha=0.4, reduction=0, tuned=tuned, **route_kw(w, dtype, route))
    assert got_l.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got_g.dtype == dtype
    assert_match(got_l, want_l, dtype, "loss")
    assert_match(got_g, want_g, dtype, "grad", max(1.0, want_g.abs().max().item()))


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("K", [4096, 4104], ids=["resident", "streamed"])
def test_long_rows_each_term_alone(tuned, route, alpha, K):
    """K >= 4096 in d = 16: the cosine term (~200) would hide a logsumexp error in the mixed loss."""
    h, w, y = make(4, K, 16, torch.float32, seed=5)
    want_l, want_g = reference(h, w, y, alpha=alpha)
    got_l, got_g = E.fused_loss(h, w, y, alpha=alpha, reduction=0, tuned=tuned,
                                **route_kw(w, torch.float32, route))
    assert_match(got_l, want_l, torch.float32, "loss")
    assert_match(got_g, want_g, torch.float32, "grad", max(1.0, want_g.abs().max().item()))


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("reduction", [1, 2])
def test_reductions_and_row_chunks(tuned, route, reduction):
    h, w, y = make(11, 32, 24, torch.float32, seed=1)
    y[[4, 7]] = -100
    want_l, want_g = reference(h, w, y, reduction={1: "mean", 2: "sum"}[reduction])
    kw = route_kw(w, torch.float32, route)
    one, g1 = E.fused_loss(h, w, y, reduction=reduction, tuned=tuned, **kw)
    # 3 rows of logits per chunk: four chunks, the last one short
    chunked, g2 = E.fused_loss(h, w, y, reduction=reduction, tuned=tuned, chunk_bytes=3 * 32 * 4, **kw)
    for got_l, got_g in ((one, g1), (chunked, g2)):
        assert_match(got_l, want_l, torch.float32, "loss")
        assert_match(got_g, want_g, torch.float32, "grad")
    assert torch.all(g2[[1, 4, 7]] == 0)


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("route", ["gather", "m"])
def test_nan_row_no_grad_and_all_ignored(tuned, route):
    h, w, y = make(6, 64, 32, torch.float32, seed=2)
    kw = route_kw(w, torch.float32, route)
    h[0, 5] = float("nan")
    loss, grad = E.fused_loss(h, w, y, reduction=0, tuned=tuned, **kw)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all() and torch.isfinite(grad[1:]).all()
    no_grad, g = E.fused_loss(h, w, y, reduction=0, tuned=tuned, need_grad=False, **kw)
    assert g.numel() == 0
    torch.testing.assert_close(no_grad, loss, equal_nan=True)
    y[:] = -100
    mean, _ = E.fused_loss(h, w, y, reduction=1, tuned=tuned, **kw)
    total, g = E.fused_loss(h, w, y, reduction=2, tuned=tuned, **kw)
    assert torch.isnan(mean) and total.item() == 0.0


# ----------------------------------------------------------------------------- the CUDA-graph capture branch
@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_capture_branch_matches_reference(tuned, route, reduction):
    """Counters and the gradient scale stay on the device: same loss and gradient as the host path."""
    h, w, y = make(9, 64, 32, torch.float32, seed=6)
    y[[4, 7]] = -100
    want_l, want_g = reference(h, w, y, reduction={0: "none", 1: "mean", 2: "sum"}[reduction])
    got_l, got_g = E.fused_loss(h, w, y, reduction=reduction, tuned=tuned, capturing=True,
                                chunk_bytes=4 * 64 * 4, **route_kw(w, torch.float32, route))
    assert_match(got_l, want_l, torch.float32, "loss")
    assert_match(got_g, want_g, torch.float32, "grad")


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("K", [64, 62], ids=["vector", "generic"])
def test_capture_branch_bad_labels_give_nan_rows_and_read_nothing_out_of_range(tuned, route, K):
    """Under capture the host cannot raise: a bad label's row gets a NaN loss and a zero gradient, the
    mean is NaN, and every other row is what it would be with the bad rows ignored."""
    h, w, y = make(8, K, 32, torch.float32, seed=7)
    bad = [2, 5]
    y_bad = y.clone()
    y_bad[bad] = torch.tensor([K + 3, -5])
    y_ref = y.clone()
    y_ref[bad] = -100
    kw = route_kw(w, torch.float32, route)
    rows, g_none = E.fused_loss(h, w, y_bad, reduction=0, tuned=tuned, capturing=True, **kw)
    want_rows, want_g = reference(h, w, y_ref)
    assert torch.isnan(rows[bad]).all()
    keep = [i for i in range(8) if i not in bad]
    assert_match(rows[keep], want_rows[keep], torch.float32, "loss")
    assert torch.all(g_none[bad] == 0)
    assert_match(g_none, want_g, torch.float32, "grad")
    mean, g_mean = E.fused_loss(h, w, y_bad, reduction=1, tuned=tuned, capturing=True, **kw)
    _, want_gm = reference(h, w, y_ref, reduction="mean")
    assert torch.isnan(mean)
    assert_match(g_mean, want_gm, torch.float32, "grad")  # 1 / (valid rows), the bad ones not counted


@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
def test_label_check_finds_the_first_bad_row(tuned):
    h, w, y = make(600, 5, 8, torch.float32, seed=3)  # three blocks of the label kernel
    y[[250, 480]] = torch.tensor([5, -1])
    with pytest.raises(ValueError, match=r"target\[250\] = 5"):
        E.fused_loss(h, w, y, tuned=tuned, **route_kw(w, torch.float32, "gather"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vector_path_is_taken_where_it_applies_and_not_elsewhere(dtype):
    h, w, _ = make(5, 64, 64, dtype)
    assert vec_taken(h, w, dtype, "gather")
    h_odd, w_odd, _ = make(5, 64, 60 if dtype == torch.bfloat16 else 62, dtype)  # d not a multiple of the width
    assert not vec_taken(h_odd, w_odd, dtype, "gather")
    flat = torch.empty(h.numel() + 1, dtype=dtype)
    h_off = flat[1:].view_as(h).copy_(h)
    assert not vec_taken(h_off, w, dtype, "gather")


def test_misaligned_features_fall_back_and_still_match():
    h, w, y = make(6, 64, 64, torch.float32, seed=4)
    flat = torch.empty(h.numel() + 1)
    h_off = flat[1:].view_as(h).copy_(h)
    assert h_off.data_ptr() % 16 != 0
    want_l, want_g = reference(h, w, y)
    got_l, got_g = E.fused_loss(h_off, w, y, reduction=0, tuned=True, **route_kw(w, torch.float32, "gather"))
    assert_match(got_l, want_l, torch.float32, "loss")
    assert_match(got_g, want_g, torch.float32, "grad")


def test_emulator_reports_a_misaligned_vector_access():
    """The alignment check itself: a vector kernel handed an unaligned row must be reported."""
    h, w, y = make(2, 8, 8, torch.float32)
    S = w @ w.T
    flat = torch.zeros(2 * 8 + 1)
    z = flat[1:].view(2, 8).copy_(h @ w.T)
    inv_wn = torch.ones(8)
    loss, inv_n = torch.empty(2), torch.empty(2)
    L = E.lib()
    p = E._p
    L.emu_row_epilogue_vec_f32(p(z), p(h), p(w), p(inv_wn), p(S),
                               ctypes.cast(y.data_ptr(), ctypes.POINTER(ctypes.c_int64)), ctypes.c_int64(2),
                               ctypes.c_int64(8), ctypes.c_int64(8), ctypes.c_double(0.4), ctypes.c_int64(-100),
                               ctypes.c_int(1), ctypes.c_double(1.0), None, p(loss), p(inv_n), None, None)
    with pytest.raises(AssertionError, match="misaligned 16-byte access"):
        E._check()


def test_rewrite_turns_every_launch_into_an_emulator_call():
    src = E.KERNELS.read_text()
    out = E.rewrite(src)
    assert src.count("<<<") == out.count("::emu::launch(") and "<<<" not in out and ">>>" not in out


# ----------------------------------------------------------------------------- what similarity means
@pytest.mark.parametrize("tuned", [False, True], ids=["default", "tuned"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 8), (5, 64, 64), (4, 4104, 16)], ids=lambda s: "B{}-K{}-d{}".format(*s))
def test_asymmetric_similarity_is_read_by_row_like_the_reference(tuned, dtype, shape):
    """Row y of similarity is label y's target in the CUDA kernels too (register and streamed rows)."""
    h, w, y = make(*shape, dtype, seed=13)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    K = shape[1]
    S = torch.triu(torch.rand(K, K, generator=torch.Generator().manual_seed(14), dtype=torch.float64)).to(acc)
    got_l, got_g = E.fused_loss(h, w, y, similarity=S, reduction=0, tuned=tuned)
    h64 = h.detach().double().clone().requires_grad_()
    want_l = ops.reference_loss(h64, w.double(), y, 0.4, "none", similarity=S.double())
    want_l.sum().backward()
    assert_match(got_l, want_l.detach(), dtype, "loss")
    assert_match(got_g, h64.grad, dtype, "grad", max(1.0, h64.grad.abs().max().item()))


def test_each_cuda_host_path_has_its_mirror():
    """Every host path of csrc/cuda (fused_loss_<path>.cpp), as the dispatcher calls it, has its namesake here."""
    cuda_dir = E.ROOT / "csrc" / "cuda"
    paths = sorted(p.stem.removeprefix("fused_loss_") for p in cuda_dir.glob("fused_loss_*.cpp"))
    assert paths == ["capture", "default", "host", "tuned"]
    dispatcher = (cuda_dir / "fused_loss.cpp").read_text()
    for path in ("capture", "default", "tuned"):
        assert f"Result fused_loss_{path}(" in (cuda_dir / f"fused_loss_{path}.cpp").read_text()
        assert f"fused_cuda::fused_loss_{path}<scalar_t>(" in dispatcher
        assert callable(getattr(E, f"fused_loss_{path}"))
