"""The cosine term's weight c (ops.cosine_scale_for, cosine_scale=): the formula, both backends, the modules, the
trainer's field and its resume rule."""

import math

import pytest
import torch
import torch.nn.functional as F

import haframe_ext as hx
from haframe_ext import ops
from haframe_ext.nn import HAFrameLoss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_native = pytest.mark.skipif(not hx.native_available(), reason="compiled extension not built")


def frame_like(K, d, seed=0, dtype=torch.float64):
    """[K, d] unit rows."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(K, d, generator=g, dtype=dtype), dim=1)


def by_hand(h, w, y, alpha, c, S):
    """The definition written out per row in float64: (1 - a) CE + a c sum_k (cos_k - S[y, k])^2, mean."""
    rows = []
    for b in range(h.shape[0]):
        z = w @ h[b]
        ce = torch.logsumexp(z, 0) - z[y[b]]
        cos = z / (h[b].norm() * w.norm(dim=1))
        rows.append((1 - alpha) * ce + alpha * c * ((cos - S[y[b]]) ** 2).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("K,d,rule,want", [(100, 100, "auto", 1.0), (100, 300, "auto", 1.0),
                                           (8004, 256, "auto", 256 / 8004), (3, 2, "auto", 2 / 3),
                                           (8004, 256, "sum", 1.0), (10, 5, 0.25, 0.25)])
def test_rule(K, d, rule, want):
    assert ops.cosine_scale_for(rule, K, d) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("bad", ["mean", "", 0, -1.0, math.nan, math.inf, True, None])
def test_bad_rule_is_refused_by_name(bad):
    with pytest.raises((ValueError, TypeError), match="cosine_scale"):
        ops.cosine_scale_for(bad, 10, 5)


@pytest.mark.parametrize("c", [1.0, 0.03, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_reference_is_the_formula(c, alpha):
    K, d, B = 12, 5, 4
    w = frame_like(K, d)
    S = w @ w.T
    h = torch.randn(B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    y = torch.tensor([0, 5, 11, 3])
    got = ops.reference_loss(h, w, y, alpha, similarity=S, cosine_scale=c)
    torch.testing.assert_close(got, by_hand(h, w, y, alpha, c, S), rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("route", ["gather", "m"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K,d,B", [(3, 2, 1), (37, 9, 7), (300, 40, 33)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_native_matches_reference(device, route, reduction, K, d, B, alpha):
    c = d / K
    w = frame_like(K, d).to(device)
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(B, d, dtype=torch.float64, generator=g) * 2).to(device)
    y = torch.randint(0, K, (B,), generator=g).to(device)
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    out = []
    for backend in ("native", "reference"):
        x = h.clone().requires_grad_()
        loss = ops.haframe_loss(x, w, y, alpha, reduction, backend=backend, cosine_scale=c, **kw)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape))
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-10, atol=1e-10)


@needs_native
@pytest.mark.parametrize("route", ["gather", "m"])
def test_native_gradcheck(route):
    K, d = 11, 4
    w = frame_like(K, d)
    kw = {"similarity": w @ w.T} if route == "gather" else {"gram": w.T @ w}
    h = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 10])
    assert torch.autograd.gradcheck(lambda x: ops.haframe_loss(x, w, y, 0.4, backend="native", cosine_scale=0.3, **kw),
                                    (h,))


def test_scale_changes_the_loss():
    """A c that were ignored would give the same number: c = 0.1 and c = 1 differ by 0.9 a L_cos."""
    K, d = 20, 6
    w = frame_like(K, d)
    h = torch.randn(5, d, dtype=torch.float64)
    y = torch.arange(5)
    l1 = ops.haframe_loss(h, w, y, 0.4, gram=w.T @ w, cosine_scale=1.0)
    l01 = ops.haframe_loss(h, w, y, 0.4, gram=w.T @ w, cosine_scale=0.1)
    lcos = ops.reference_loss(h, w, y, 1.0, gram=w.T @ w)
    torch.testing.assert_close(l1 - l01, 0.4 * 0.9 * lcos, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K,d", [(30, 30), (30, 45), (30, 8)])
@pytest.mark.parametrize("rule", ["auto", "sum", 0.5])
def test_module_applies_the_rule(K, d, rule):
    w = frame_like(K, d)
    loss = HAFrameLoss(w, alpha=0.4, cosine_scale=rule)
    want_c = {"auto": min(d, K) / K, "sum": 1.0}.get(rule, rule)
    assert loss.cosine_factor == pytest.approx(want_c)
    h = torch.randn(6, d, dtype=torch.float64)
    y = torch.randint(0, K, (6,))
    held = loss.weight.double()  # the classifier holds the frame in float32
    torch.testing.assert_close(loss(h, y), by_hand(h, held, y, 0.4, want_c, held @ held.T), rtol=1e-6, atol=1e-6)


def test_module_default_is_auto_and_paper_frames_are_unchanged():
    frame = hx.HAFrame.from_hierarchy(hx.Hierarchy.builtin("cifar100"), gamma=2.0)
    loss = HAFrameLoss(frame)
    assert loss.cosine_scale == "auto" and loss.cosine_factor == 1.0


def test_module_refuses_a_bad_rule():
    with pytest.raises(ValueError, match="cosine_scale"):
        HAFrameLoss(frame_like(5, 5), cosine_scale="avg")


# ----------------------------------------------------------------------------- the trainer's field and its resume rule
def _run_config(tmp_path, **kw):
    from helpers import toy_train_config

    return toy_train_config(tmp_path, stop_after_epochs=1, **kw)


@pytest.mark.parametrize("value", ["avg", 0, -0.5, math.inf, True])
def test_config_refuses_a_bad_cosine_scale_naming_the_flag(tmp_path, value):
    cfg = _run_config(tmp_path, cosine_scale=value)
    with pytest.raises(ValueError, match="--cosine-scale"):
        cfg.validate()


def test_cli_parses_rules_and_numbers():
    from haframe_ext.cli import build_parser
    from haframe_ext.cli.commands import UserError

    p = build_parser()
    assert p.parse_args(["train", "--cosine-scale", "sum"]).cosine_scale == "sum"
    assert p.parse_args(["train", "--cosine-scale", "0.25"]).cosine_scale == 0.25
    with pytest.raises(UserError, match="--cosine-scale: must be auto or sum or a number > 0, got 'avg'"):
        p.parse_args(["train", "--cosine-scale", "avg"])


@pytest.mark.parametrize("dim,rule,want", [(None, "auto", 1.0), (4, "auto", 0.5), (4, "sum", 1.0), (4, 0.1, 0.1)])
def test_the_trainer_builds_the_loss_with_the_rule(tmp_path, dim, rule, want):
    from haframe_ext.training.config import build_from_config

    cfg = _run_config(tmp_path, cosine_scale=rule, feature_dim=dim)
    cfg.validate()
    crit = build_from_config(cfg)["criterion"]
    assert crit.cosine_factor == pytest.approx(want)  # the toy tree has 8 classes


def _checkpoint_without_the_field(out):
    """Rewrite last.pt as a checkpoint written before cosine_scale was a field (config without the key)."""
    from haframe_ext.files import atomic_save
    from haframe_ext.training.checkpoint import load_checkpoint, seal_checkpoint

    path = out / "last.pt"
    ck = load_checkpoint(path)
    del ck["config"]["cosine_scale"]
    ck.pop("digest")
    atomic_save(seal_checkpoint(ck), path)


def test_an_old_checkpoint_resumes_at_the_paper_setting_and_is_refused_where_the_rule_changes_the_loss(tmp_path):
    from haframe_ext.training.checkpoint import CheckpointError
    from haframe_ext.training.config import TrainConfig
    from haframe_ext.train import train

    cfg = _run_config(tmp_path)  # d = K = 8: "auto" and the old sum give the same loss
    train(cfg)
    _checkpoint_without_the_field(tmp_path / "run")
    res = train(TrainConfig.from_dict(dict(cfg.to_dict(), stop_after_epochs=None, resume=True)))
    assert res["epochs"] == 3

    (tmp_path / "low").mkdir()
    low = _run_config(tmp_path / "low", feature_dim=4)  # d < K: "auto" halves the term, the old run summed it
    train(low)
    _checkpoint_without_the_field(tmp_path / "low" / "run")
    with pytest.raises(CheckpointError, match="cosine_scale"):
        train(TrainConfig.from_dict(dict(low.to_dict(), stop_after_epochs=None, resume=True)))
    res = train(TrainConfig.from_dict(dict(low.to_dict(), stop_after_epochs=None, resume=True, cosine_scale="sum")))
    assert res["epochs"] == 3
