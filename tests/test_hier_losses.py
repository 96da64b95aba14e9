"""HXE, soft labels and the fused trainable-classifier losses: float64 parity with brute-force formulas, limits,
errors."""

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import haframe_ext as hx
from haframe_ext import Hierarchy
from haframe_ext.ops import hier_losses
from helpers import FAST, trees

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["reference"] + (["native"] if hier_losses._NATIVE else [])
KINDS = hier_losses.KINDS
BUILTINS = ["cifar100", "fgvc_aircraft", "inat19", "tiered_imagenet_h"]
RTOL, ATOL = 1e-10, 1e-13  # float64 parity with the formulas


# ----------------------------------------------------------------------------- brute force, from the formulas
def node_masks(h: Hierarchy):
    """(names, mask [n, K] bool: class c lies under node n, depth [n]) from the public tree API."""
    names = h.nodes
    index = {n: i for i, n in enumerate(names)}
    mask = np.zeros((len(names), h.num_classes), dtype=bool)
    for c, name in enumerate(h.classes):
        for a in [name] + h.ancestors(name):
            mask[index[a], c] = True
    return names, mask, np.array([h.depth(n) for n in names], dtype=np.float64)


def brute_hxe(z, y, h, alpha, normalize):  # z [B, K] float64 with autograd, y [B]
    """sum_i w(v_i) -log(p(v_i) / p(v_{i-1})) on each label's root path, p(n) summed over the classes under n."""
    names, mask, depth = node_masks(h)
    index = {n: i for i, n in enumerate(names)}
    m = torch.as_tensor(mask)
    logp = torch.logsumexp(torch.where(m[None], z[:, None, :], -math.inf), 2) - torch.logsumexp(z, 1, keepdim=True)
    w = np.exp(-alpha * depth)
    if normalize:
        w = w / w.sum()
    rows = []
    for b in range(z.shape[0]):
        path = [h.classes[int(y[b])]] + h.ancestors(h.classes[int(y[b])])  # leaf ... root
        total = z.new_zeros(())
        for child, parent in zip(path[:-1], path[1:]):
            total = total - w[index[child]] * (logp[b, index[child]] - logp[b, index[parent]])
        rows.append(total)
    return torch.stack(rows)


def brute_soft(z, y, d, beta):  # z [B, K], d [K, K]
    """-sum_c q_y(c) log p_c with q_y = softmax(-beta d[y] / d_max), dense."""
    d = torch.as_tensor(np.asarray(d, dtype=np.float64))
    q = torch.softmax(-beta * d / d.max(), 1)[y]
    return -(q * torch.log_softmax(z, 1)).sum(1)


def brute(kind, z, y, h, alpha=0.1, normalize=True, beta=10.0):
    if kind == "hxe":
        return brute_hxe(z, y, h, alpha, normalize)
    if kind == "soft-labels":
        return brute_soft(z, y, h.distances(), beta)
    return F.cross_entropy(z, y, reduction="none")


def close(got, want, what):
    torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: {m}")


def check_linear(h, kind, B, d, seed, backend, device="cpu", alpha=0.3, normalize=True, beta=4.0, reduction="mean"):
    """Fused loss and its features/weight/bias gradients against autograd through the brute-force formula."""
    g = torch.Generator().manual_seed(seed)
    K = h.num_classes
    x = (torch.randn(B, d, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    W = torch.randn(K, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(K, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g).to(device)
    go = torch.rand(B, generator=g, dtype=torch.float64).to(device) if reduction == "none" else None
    loss = hx.linear_hierarchical_loss(x, W, y, h, kind, alpha=alpha, normalize=normalize, beta=beta, bias=b,
                                       reduction=reduction, backend=backend)
    got = torch.autograd.grad(loss, (x, W, b), go)
    want_rows = brute(kind, x.cpu() @ W.cpu().T + b.cpu(), y.cpu(), h, alpha, normalize, beta)
    want = want_rows if reduction == "none" else (want_rows.mean() if reduction == "mean" else want_rows.sum())
    close(loss, want, f"{kind} loss")
    wants = torch.autograd.grad(want, (x, W, b), None if go is None else go.cpu())
    for name, a, e in zip(("features", "weight", "bias"), got, wants):
        close(a, e, f"{kind} d/d{name}")


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("kind", ["hxe", "soft-labels"])
def test_logit_losses_match_the_formulas_on_the_bundled_trees(name, kind):
    h = Hierarchy.builtin(name)
    K = h.num_classes
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(6, K, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.randint(0, K, (6,), generator=g)
    if kind == "hxe":
        got = hx.hxe_loss(z, y, h, alpha=0.4, reduction="none")
        want = brute_hxe(z, y, h, 0.4, True)
    else:
        got = hx.soft_label_loss(z, y, h, beta=3.0, reduction="none")
        want = brute_soft(z, y, h.distances(), 3.0)
    close(got, want, "loss")
    go = torch.rand(6, generator=g, dtype=torch.float64)
    close(torch.autograd.grad(got, z, go)[0], torch.autograd.grad(want, z, go)[0], "d/dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_matches_the_formulas_on_the_bundled_trees(name, kind, backend):
    check_linear(Hierarchy.builtin(name), kind, B=5, d=13, seed=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_reductions(kind, reduction, backend):
    check_linear(Hierarchy.builtin("cifar100"), kind, B=7, d=9, seed=3, backend=backend, reduction=reduction)


def check_random_tree(tree, backend):
    parent_of, classes = tree
    h = Hierarchy.from_parents(parent_of, classes)
    seed = len(classes)
    for kind in ("hxe", "soft-labels"):
        check_linear(h, kind, B=3, d=5, seed=seed, backend=backend, alpha=0.7, normalize=seed % 2 == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(FAST, max_examples=10)
@given(tree=trees(max_k=40, styles=("plain",)))
def test_fused_linear_matches_the_formulas_on_random_trees(tree, backend):
    """Balanced, star, caterpillar (depth K - 1) and random trees with unary chains (10 per backend; 50 with
    --runslow)."""
    check_random_tree(tree, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@settings(FAST, max_examples=50)
@given(tree=trees(max_k=40, styles=("plain",)))
def test_fused_linear_matches_the_formulas_on_50_random_trees(tree, backend):
    """The issue's 50 hypothesis trees per backend, unbalanced ones included."""
    check_random_tree(tree, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [3, 100])
def test_awkward_shapes_one_row_and_three_classes(K, backend, device):
    h = Hierarchy.random(K, seed=K) if K > 3 else Hierarchy.from_parents({"a": "r", "m": "r", "b": "m", "c": "m"})
    for kind in KINDS:
        check_linear(h, kind, B=1, d=7, seed=K, backend=backend, device=device)


def test_published_convention_drives_the_soft_targets():
    """Unbalanced tree: the soft targets follow d under the hierarchy's convention, and the two differ."""
    h = Hierarchy.from_parents({"A": "r", "B": "r", "a1": "A", "a2": "A", "b1": "B", "B2": "B", "b2": "B2",
                                "b3": "B2"})
    z = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])
    for conv in ("published", "height"):
        hc = h.with_convention(conv)
        close(hx.soft_label_loss(z, y, hc, beta=2.0, reduction="none"), brute_soft(z, y, hc.distances(), 2.0), conv)


# ----------------------------------------------------------------------------- limits
def test_hxe_with_alpha_zero_unnormalised_is_cross_entropy():
    h = Hierarchy.builtin("inat19")
    z = torch.randn(9, h.num_classes, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, h.num_classes, (9,))
    got = hx.hxe_loss(z, y, h, alpha=0.0, normalize=False)
    want = F.cross_entropy(z, y)
    close(got, want, "loss")
    close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0], "grad")


def test_soft_labels_tend_to_cross_entropy_as_beta_grows():
    # |loss - CE| need not fall monotonically (the soft loss can cross CE at a small beta), but the target's mass
    # off the label falls as exp(-beta / d_max), so the gap vanishes for large beta and is clear at beta = 1
    g = torch.Generator().manual_seed(0)
    h = Hierarchy.builtin("cifar100")
    z = torch.randn(8, 100, dtype=torch.float64, generator=g)
    y = torch.randint(0, 100, (8,), generator=g)
    ce = F.cross_entropy(z, y)
    gaps = [abs(float(hx.soft_label_loss(z, y, h, beta=b)) - float(ce)) for b in (1.0, 10.0, 100.0, 1000.0)]
    assert gaps[0] > 1e-3 and gaps[2] < 1e-6 and gaps[3] < 1e-12, gaps


def test_soft_label_gradient_is_the_kl_form():
    h = Hierarchy.builtin("fgvc_aircraft")
    K = h.num_classes
    z = torch.randn(5, K, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, K, (5,))
    d = torch.as_tensor(h.distances(), dtype=torch.float64)
    q = torch.softmax(-10.0 * d / d.max(), 1)[y]
    kl = F.kl_div(torch.log_softmax(z, 1), q, reduction="batchmean")
    ours = hx.soft_label_loss(z, y, h, beta=10.0)
    close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(kl, z)[0], "grad")
    entropy = -(q * q.log()).sum(1).mean()
    close(ours, kl + entropy, "loss = KL + H(q)")


def test_soft_labels_from_a_distance_matrix_equal_the_tree():
    h = Hierarchy.builtin("cifar100")
    z = torch.randn(4, 100, dtype=torch.float64)
    y = torch.randint(0, 100, (4,))
    close(hx.soft_label_loss(z, y, h.distances(), beta=5.0), hx.soft_label_loss(z, y, h, beta=5.0), "matrix")


def test_huge_logit_gaps_do_not_underflow():
    """A label whose branch has probability ~exp(-2000): log space keeps loss and gradient finite and exact."""
    h = Hierarchy.from_parents({"A": "r", "B": "r", "a1": "A", "a2": "A", "b1": "B", "b2": "B"}, ["a1", "a2", "b1",
                                                                                                   "b2"])
    z = torch.tensor([[0.0, -1.0, 2000.0, 2000.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0])
    loss = hx.hxe_loss(z, y, h, alpha=1.0, normalize=False).detach()  # w(A) = e^-1, w(a1) = e^-2
    (g,) = torch.autograd.grad(hx.hxe_loss(z, y, h, alpha=1.0, normalize=False), z)
    w1, w2, s = math.exp(-1), math.exp(-2), math.log1p(math.exp(-1))
    lse = math.log(2) + 2000.0
    assert abs(float(loss) - (w1 * (lse - s) + w2 * s)) < 1e-12 * float(loss)
    q = 1 / (1 + math.exp(-1))  # p(a1 | A)
    assert abs(float(g[0, 0]) - (-w1 * q - w2 * (1 - q))) < 1e-14


# ----------------------------------------------------------------------------- modules
def test_modules_match_the_functions():
    h = Hierarchy.builtin("cifar100")
    z = torch.randn(4, 100)
    y = torch.randint(0, 100, (4,))
    assert torch.equal(hx.HXELoss(h, alpha=0.2)(z, y), hx.hxe_loss(z, y, h, alpha=0.2))
    assert torch.equal(hx.SoftLabelLoss(h, beta=3.0)(z, y), hx.soft_label_loss(z, y, h, beta=3.0))
    m = hx.LinearHierarchicalLoss(16, h, "hxe", alpha=0.2)
    x = torch.randn(4, 16)
    loss = m(x, y)
    loss.backward()
    assert m.weight.grad is not None and m.linear.bias.grad is not None
    want = hx.hxe_loss(m.logits(x), y, h, alpha=0.2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_alpha_and_beta_must_be_finite_and_non_negative(bad):
    h = Hierarchy.builtin("cifar100")
    z, y = torch.randn(2, 100), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        hx.hxe_loss(z, y, h, alpha=bad)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        hx.soft_label_loss(z, y, h, beta=bad)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        hx.linear_hierarchical_loss(torch.randn(2, 4), torch.randn(100, 4), y, h, "soft-labels", beta=bad)


def test_hxe_needs_a_tree_not_a_distance_matrix():
    h = Hierarchy.builtin("cifar100")
    with pytest.raises(ValueError, match="HXE needs a tree"):
        hx.hxe_loss(torch.randn(2, 100), torch.tensor([0, 1]), h.distances())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", [-1, 100])
def test_labels_out_of_range(label, backend):
    h = Hierarchy.builtin("cifar100")
    y = torch.tensor([3, label])
    with pytest.raises(ValueError, match=r"target\[1\] = .* labels must be in \[0, 100\)"):
        hx.hxe_loss(torch.randn(2, 100), y, h)
    with pytest.raises(ValueError, match=r"target\[1\]"):
        hx.linear_hierarchical_loss(torch.randn(2, 4), torch.randn(100, 4), y, h, "soft-labels", backend=backend)


def test_other_mistakes_get_one_line_errors():
    h = Hierarchy.builtin("cifar100")
    y = torch.tensor([0, 1])
    cases = [
        (lambda: hx.hxe_loss(torch.randn(2, 99), y, h), ValueError, "hierarchy has 100 classes"),
        (lambda: hx.linear_hierarchical_loss(torch.randn(2, 4), torch.randn(100, 4), y, h, "hxd"), ValueError,
         "kind must be one of"),
        (lambda: hx.linear_hierarchical_loss(torch.randn(2, 4), torch.randn(100, 5), y, h), ValueError,
         "features have d=4"),
        (lambda: hx.soft_label_loss(torch.randn(2, 100), y, h, reduction="avg"), ValueError, "reduction must be"),
        (lambda: hx.soft_label_loss(torch.randn(2, 100), y.float(), h), TypeError, "integer class indices"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text) as info:
            fn()
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the op: dtypes, gradcheck, opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_matches_float64(kind, dtype, tol, backend, device):
    """float32 / bfloat16 inputs (accumulated in float32) against the float64 formula on the same rounded inputs."""
    h = Hierarchy.random(203, seed=5)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 29, generator=g) * 0.5).to(dtype)
    W = torch.randn(h.num_classes, 29, generator=g).to(dtype)
    b = torch.randn(h.num_classes, generator=g).to(dtype)
    y = torch.randint(0, h.num_classes, (9,), generator=g)
    ins = [t.to(device).requires_grad_() for t in (x, W, b)]
    loss = hx.linear_hierarchical_loss(*ins[:2], y.to(device), h, kind, bias=ins[2], alpha=0.2, beta=6.0,
                                       backend=backend)
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, ins)
    ref = [t.double().requires_grad_() for t in (x, W, b)]
    want = brute(kind, ref[0] @ ref[1].T + ref[2], y, h, 0.2, True, 6.0).mean()
    wants = torch.autograd.grad(want, ref)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=tol, atol=tol)
    for a, e in zip(got, wants):
        assert a.dtype == dtype
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), e, rtol=tol * 10, atol=tol * scale * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_branch_of_probability_exp_minus_2000_stays_exact_in_the_op(dtype, backend):
    """Logits fed through an identity weight: the label's whole branch underflows against the row max."""
    h = Hierarchy.from_parents({"A": "r", "B": "r", "a1": "A", "a2": "A", "b1": "B", "b2": "B"}, ["a1", "a2", "b1",
                                                                                                   "b2"])
    x = torch.tensor([[-2000.0, -2001.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    loss = hx.linear_hierarchical_loss(x, torch.eye(4, dtype=dtype), torch.tensor([0]), h, "hxe", alpha=1.0,
                                       normalize=False, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    w1, w2, s = math.exp(-1), math.exp(-2), math.log1p(math.exp(-1))
    q = 1 / (1 + math.exp(-1))
    rel = 1e-12 if dtype == torch.float64 else 1e-4  # float32: logits of 2000 are rounded to 1.2e-4
    assert abs(loss.item() - (w1 * (math.log(2) + 2000.0 - s) + w2 * s)) < rel * loss.item()
    want = torch.tensor([-w1 * q - w2 * (1 - q), -w1 * (1 - q) + w2 * (1 - q), w1 / 2, w1 / 2], dtype=torch.float64)
    torch.testing.assert_close(g.double()[0], want, rtol=rel * 10, atol=rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, backend):
    h = Hierarchy.random(11, seed=3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (4,), generator=g)
    for reduction in ("mean", "none"):
        fn = lambda x, W, b: hx.linear_hierarchical_loss(x, W, y, h, kind, bias=b, alpha=0.3, beta=3.0,  # noqa: E731
                                                         reduction=reduction, backend=backend)
        assert torch.autograd.gradcheck(fn, (x, W, b))
    zz = (x @ W.T).detach().requires_grad_()
    if kind == "hxe":
        assert torch.autograd.gradcheck(lambda z: hx.hxe_loss(z, y, h, alpha=0.3, reduction="none"), (zz,))
    elif kind == "soft-labels":
        assert torch.autograd.gradcheck(lambda z: hx.soft_label_loss(z, y, h, beta=3.0, reduction="none"), (zz,))


def op_args(kind, reduction, device="cpu", B=3, d=6, seed=0):
    """Arguments of torch.ops.haframe_ext.hier_loss for a small random tree."""
    h = Hierarchy.random(9, seed=seed)
    spec = hier_losses._Spec(kind, 9, h, alpha=0.2, beta=2.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(9, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(9, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randint(0, 9, (B,), generator=g).to(device)
    start, end, value = spec.paths(y)
    red = {"none": 0, "mean": 1, "sum": 2}[reduction]
    return (x, W, b, spec.order(x.device), start, end, value, spec.op_kind, None, red, red != 0, red != 0)


@pytest.mark.skipif(not hier_losses._NATIVE, reason="compiled extension not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, reduction, device):
    torch.library.opcheck(torch.ops.haframe_ext.hier_loss, op_args(kind, reduction, device))


@pytest.mark.skipif(not hier_losses._NATIVE, reason="compiled extension not built")
@pytest.mark.parametrize("kind", KINDS)
def test_native_op_equals_its_plain_pytorch_twin(kind):
    args = op_args(kind, "sum", B=5, seed=4)
    got = torch.ops.haframe_ext.hier_loss(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    want = hier_losses.reference_hier_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    for a, e in zip(got, want):
        close(a, e, kind)


@pytest.mark.skipif(not hier_losses._NATIVE, reason="compiled extension not built")
def test_native_op_refuses_malformed_paths():
    x, W, b, order, start, end, value, kind, _, red, ng, nw = op_args("hxe", "mean")
    bad = start.clone()
    bad[0, 1] = 50  # outside [0, K)
    with pytest.raises(ValueError, match="nested depth-first ranges"):
        torch.ops.haframe_ext.hier_loss(x, W, b, order, bad, end, value, kind, None, red, ng, nw)
    with pytest.raises(ValueError, match="kind must be"):
        torch.ops.haframe_ext.hier_loss(x, W, b, order, start, end, value, 7, None, red, ng, nw)


# ----------------------------------------------------------------------------- the CUDA kernel, emulated on the CPU
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CPU emulator")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ["hxe-none", "soft-labels-mean", "cross-entropy-sum", "hxe-chunks"])
def test_emulated_cuda_kernel_matches_the_reference(case, dtype):
    """csrc/cuda/hier_loss_kernels.cu executed by tests/cuda_emu: every row written, equal to the plain-PyTorch twin."""
    E = pytest.importorskip("cuda_emu.hier_emulated")
    kind, reduction = case.rsplit("-", 1)
    chunk = {}
    if reduction == "chunks":  # three rows per chunk: the host's chunk loop and row offsets
        reduction, chunk = "mean", {"chunk_bytes": 3 * 9 * (8 if dtype == torch.float64 else 4)}
    args = list(op_args(kind, reduction, B=7, d=5, seed=8))
    args = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 3 else
            (a.detach() if isinstance(a, torch.Tensor) else a) for i, a in enumerate(args)]
    args[8] = torch.rand(7, dtype=torch.float64) if reduction == "none" else None  # row_scale
    args[10] = args[11] = True
    got = E.hier_loss(*args, **chunk)
    want = hier_losses.reference_hier_op(*args)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CPU emulator")
def test_emulated_cuda_kernel_keeps_an_underflowed_branch_exact():
    E = pytest.importorskip("cuda_emu.hier_emulated")
    h = Hierarchy.from_parents({"A": "r", "B": "r", "a1": "A", "a2": "A", "b1": "B", "b2": "B"}, ["a1", "a2", "b1",
                                                                                                   "b2"])
    spec = hier_losses._Spec("hxe", 4, h, alpha=1.0, normalize=False)
    y = torch.tensor([0])
    start, end, value = spec.paths(y)
    x = torch.tensor([[-2000.0, -2001.0, 0.0, 0.0]], dtype=torch.float64)
    args = (x, torch.eye(4, dtype=torch.float64), None, spec.order(x.device), start, end, value, spec.op_kind, None, 2,
            True, True)
    for a, e in zip(E.hier_loss(*args), hier_losses.reference_hier_op(*args)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_second_backward_gives_the_same_gradients(backend):
    """The forward's gradients are handed over by the first backward; a second one through the graph recomputes."""
    h = Hierarchy.builtin("cifar100")
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(100, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 100, (5,))
    loss = hx.linear_hierarchical_loss(x, W, y, h, "hxe", backend=backend) * 3
    first = torch.autograd.grad(loss, (x, W), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W))
    for a, b in zip(first, second):
        close(a, b, "second backward")
