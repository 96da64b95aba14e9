"""Tests for haframe_ext.nn and haframe_ext.training.models: fixed-frame classifier, transformation layers,
alpha schedules, the HAFrame loss module and the model factory."""

import math

import pytest
import torch
import torch.nn as nn

from haframe_ext import ops
from haframe_ext.frame import HAFrame
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.training.models import (METHODS, build_backbone, build_loss, build_model, mlp, resnet50, small_cnn,
                                wide_resnet28)
from haframe_ext.training.optim import compute_loss
from haframe_ext.nn import (SCHEDULES, FixedFrameClassifier, HAFrameLoss, HAFrameModel, TransformationLayerI,
                            TransformationLayerII, alpha_at)


@pytest.fixture(scope="module")
def cifar_frame():
    return HAFrame.from_hierarchy(Hierarchy.builtin("cifar100"), 2.0)


# ----------------------------------------------------------------------------- FixedFrameClassifier
def test_classifier_weight_is_buffer_not_parameter(cifar_frame):
    clf = FixedFrameClassifier(cifar_frame)
    assert list(clf.parameters()) == []
    names = dict(clf.named_buffers())
    assert set(names) == {"weight", "similarity"}
    assert torch.allclose(clf.weight, cifar_frame.weight.float())
    assert not clf.weight.requires_grad
    sd = clf.state_dict()
    assert set(sd) == {"weight", "similarity"}


def test_classifier_state_dict_round_trip(cifar_frame):
    clf = FixedFrameClassifier(cifar_frame)
    other = FixedFrameClassifier(HAFrame.etf(100))
    assert not torch.equal(other.weight, clf.weight)
    other.load_state_dict(clf.state_dict())
    assert torch.equal(other.weight, clf.weight)
    assert torch.equal(other.similarity, clf.similarity)


def test_classifier_logits_and_tensor_input():
    w = torch.nn.functional.normalize(torch.randn(5, 7), dim=1)
    clf = FixedFrameClassifier(w)
    h = torch.randn(3, 7)
    assert torch.allclose(clf(h), h @ w.T, atol=1e-6)
    assert torch.allclose(clf.similarity, w @ w.T, atol=1e-6)
    with pytest.raises(ValueError, match="features of shape"):
        clf(torch.randn(3, 6))


def test_frame_stays_fixed_during_training(cifar_frame):
    torch.manual_seed(0)
    model = build_model("haframe", "mlp", 100, cifar_frame, in_dim=16, hidden=32)
    loss_fn = build_loss("haframe", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    w0 = model.classifier.weight.clone()
    for _ in range(3):
        x, y = torch.randn(8, 16), torch.randint(0, 100, (8,))
        f, _ = model(x)
        loss = loss_fn(f, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.classifier.weight, w0)
    assert all(p is not model.classifier.weight for p in model.parameters())


# ----------------------------------------------------------------------------- transformation layers
def test_transformation_layer_two_conv_and_vector_shapes():
    conv = TransformationLayerII(8, num_classes=6, out_dim=10, num_blocks=2, conv=True)
    assert conv(torch.randn(4, 8, 5, 5)).shape == (4, 10)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        conv(torch.randn(4, 8))
    vec = TransformationLayerII(12, num_classes=6, num_blocks=3)
    assert vec(torch.randn(4, 12)).shape == (4, 6)
    assert isinstance(vec.out, nn.Identity)
    same = TransformationLayerII(6, num_classes=6, num_blocks=0)
    assert isinstance(same.proj, nn.Identity)
    assert same(torch.randn(3, 6)).shape == (3, 6)
    # residual blocks are Linear(no bias) -> BN -> PReLU
    blk = vec.blocks[0]
    assert blk.linear.bias is None and isinstance(blk.bn, nn.BatchNorm1d) and isinstance(blk.act, nn.PReLU)


def test_transformation_layer_one_shapes():
    t = TransformationLayerI(8, 16)
    assert t(torch.randn(4, 8)).shape == (4, 16)
    assert t(torch.randn(4, 8, 3, 3)).shape == (4, 16)  # pooled first
    assert isinstance(t.act, nn.ELU)


def test_type_two_features_can_be_negative():
    torch.manual_seed(0)
    t = TransformationLayerII(10, 5, num_blocks=2)
    assert (t(torch.randn(64, 10)) < 0).any()


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule,epoch,expected", [
    ("constant", 0, 0.4), ("constant", 7, 0.4),
    ("linear-increase", 0, 0.0), ("linear-increase", 5, 0.2), ("linear-increase", 10, 0.4),
    ("linear-decrease", 0, 0.4), ("linear-decrease", 5, 0.2), ("linear-decrease", 10, 0.0),
    ("cosine", 0, 0.0), ("cosine", 2, 0.2), ("cosine", 4, 0.4), ("cosine", 8, 0.0),
    ("cosine-linear", 0, 0.0), ("cosine-linear", 4, 0.4 * 1.0 * 0.4), ("cosine-linear", 2, 0.4 * 0.5 * 0.2),
    ("cosine-linear-increase", 4, 0.16),
    ("cosine-linear-decrease", 4, 0.4 * (1 - 0.4)), ("cosine-linear-decrease", 0, 0.4),
])
def test_schedule_values(schedule, epoch, expected):
    assert alpha_at(schedule, 0.4, epoch, total_epochs=10, period=8) == pytest.approx(expected, abs=1e-12)


def test_schedules_match_paper_code_with_unit_base():
    # the paper code's mixing_ratio_scheduler (alpha part), base alpha 1
    E, p = 100, 20.0
    for e in (0, 3, 17, 50, 99):
        wave = 0.5 * (1 - math.cos(2 * (math.pi / p) * e))
        assert alpha_at("linear-decrease", 1.0, e, E) == pytest.approx(1 - e / E)
        assert alpha_at("linear-increase", 1.0, e, E) == pytest.approx(e / E)
        assert alpha_at("cosine", 1.0, e, E, p) == pytest.approx(wave)
        assert alpha_at("cosine-linear", 1.0, e, E, p) == pytest.approx(wave * e / E)
        assert alpha_at("cosine-linear-decrease", 1.0, e, E, p) == pytest.approx(1 - wave * e / E)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at("wiggly", 0.4, 0, 10, 2)
    with pytest.raises(ValueError, match="period"):
        HAFrameLoss(torch.eye(3), schedule="cosine")
    with pytest.raises(ValueError, match="total_epochs"):
        HAFrameLoss(torch.eye(3), schedule="linear-increase")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        HAFrameLoss(torch.eye(3), alpha=1.5)
    assert set(SCHEDULES) >= {"constant", "linear-increase", "linear-decrease", "cosine", "cosine-linear"}


# ----------------------------------------------------------------------------- HAFrameLoss
def test_loss_matches_reference_and_follows_schedule(cifar_frame):
    loss_fn = HAFrameLoss(cifar_frame, alpha=0.4, schedule="linear-increase", total_epochs=10)
    assert set(dict(loss_fn.named_buffers())) == {"frame.weight", "frame.similarity"}  # its own frame
    assert list(loss_fn.parameters()) == []
    torch.manual_seed(0)
    h = torch.randn(16, 100, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 100, (16,))
    assert loss_fn.alpha == 0.0
    loss_fn.set_epoch(5)
    assert loss_fn.alpha == pytest.approx(0.2)
    got = loss_fn(h, y)
    ref = ops.reference_loss(h.double(), loss_fn.weight.double(), y, 0.2, similarity=loss_fn.similarity.double())
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    got.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    # the epoch travels with the state dict
    fresh = HAFrameLoss(cifar_frame, alpha=0.4, schedule="linear-increase", total_epochs=10)
    fresh.load_state_dict(loss_fn.state_dict())
    assert fresh.epoch == 5 and fresh.alpha == pytest.approx(0.2)


def test_loss_backends_agree(cifar_frame):
    torch.manual_seed(1)
    h = torch.randn(32, 100, requires_grad=True)
    y = torch.randint(0, 100, (32,))
    auto = HAFrameLoss(cifar_frame, alpha=0.4)
    ref = HAFrameLoss(cifar_frame, alpha=0.4, backend="reference")
    la, lr = auto(h, y), ref(h, y)
    (ga,) = torch.autograd.grad(la, h)
    (gr,) = torch.autograd.grad(lr, h)
    assert la.item() == pytest.approx(lr.item(), rel=1e-5)
    assert torch.allclose(ga, gr, rtol=1e-4, atol=1e-6)


def test_loss_accepts_half_precision_features(cifar_frame):
    loss_fn = HAFrameLoss(cifar_frame)
    h = torch.randn(4, 100).to(torch.bfloat16)
    out = loss_fn(h, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_loss_from_classifier_shares_frame(cifar_frame):
    clf = FixedFrameClassifier(cifar_frame)
    loss_fn = HAFrameLoss(clf, alpha=0.0)
    h = torch.randn(5, 100)
    y = torch.randint(0, 100, (5,))
    ce = torch.nn.functional.cross_entropy(clf(h), y)
    assert loss_fn(h, y).item() == pytest.approx(ce.item(), rel=1e-5)


# ----------------------------------------------------------------------------- models
def test_model_returns_features_and_logits(cifar_frame):
    m = HAFrameModel(mlp(16, 32), TransformationLayerII(32, 100), FixedFrameClassifier(cifar_frame))
    f, z = m(torch.randn(4, 16))
    assert f.shape == (4, 100) and z.shape == (4, 100)
    assert m.fixed_frame


@pytest.mark.parametrize("method", METHODS)
def test_build_model_every_method(method):
    h = Hierarchy.builtin("cifar100")
    model = build_model(method, "mlp", 100, hierarchy=h, in_dim=16, hidden=32)
    loss_fn = build_loss(method, model, alpha=0.4, hierarchy=h)
    f, z = model(torch.randn(4, 16))
    assert z.shape == (4, 100)
    y = torch.randint(0, 100, (4,))
    loss = compute_loss(loss_fn, f, z, y)
    assert torch.isfinite(loss)
    if method in ("cross-entropy", "hxe", "soft-labels", "multi-level"):  # a trained head on the type-I layer
        assert isinstance(model.transform, TransformationLayerI)
        assert list(model.classifier.parameters()) and all(p.requires_grad for p in model.classifier.parameters())
        assert getattr(loss_fn, "reads_features", False) == (method != "cross-entropy")
    else:
        assert isinstance(model.classifier, FixedFrameClassifier)
        assert isinstance(model.transform, TransformationLayerII)
        assert list(model.classifier.parameters()) == []
    if method == "haframe-ce":
        assert loss_fn.alpha == 0.0
    if method == "etf":
        S = model.classifier.similarity
        assert S[0, 1].item() == pytest.approx(-1 / 99, abs=1e-5)


def test_build_model_errors():
    with pytest.raises(ValueError, match="valid methods: cross-entropy, haframe, etf, haframe-ce"):
        build_model("softmax", "mlp", 10, in_dim=4)
    with pytest.raises(ValueError, match="valid backbones"):
        build_model("cross-entropy", "vgg", 10)
    with pytest.raises(ValueError, match="needs a frame, a hierarchy or a distance matrix"):
        build_model("haframe", "mlp", 10, in_dim=4)
    with pytest.raises(ValueError, match="classes"):
        build_model("haframe", "mlp", 10, hierarchy=Hierarchy.builtin("cifar100"), in_dim=4)


def test_conv_backbones_shapes():
    x = torch.randn(2, 3, 32, 32)
    wrn = wide_resnet28(k=1)
    assert wrn(x).shape == (2, 64, 8, 8) and wrn.out_features == 64 and wrn.conv_output
    cnn = small_cnn(width=8)
    assert cnn(x).shape == (2, 32, 8, 8)
    model = build_model("etf", cnn, 10, feature_dim=12)
    f, z = model(x)
    assert f.shape == (2, 12) and z.shape == (2, 10)
    assert isinstance(model.transform.proj, nn.Conv2d)


def test_resnet50_needs_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs torchvision"):
            resnet50()
        with pytest.raises(ImportError, match="needs torchvision"):
            build_backbone("resnet50")
    else:
        assert resnet50().out_features == 2048


def test_large_bare_frame_keeps_no_k_by_k_similarity_and_uses_the_d_by_d_route():
    w = torch.nn.functional.normalize(torch.randn(5000, 16), dim=1)
    loss_fn = HAFrameLoss(w, alpha=0.4)
    assert loss_fn.similarity is None and FixedFrameClassifier(w).similarity is None
    h = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5000, (6,))
    got = loss_fn(h, y)
    assert loss_fn.cosine_factor == 16 / 5000  # cosine_scale="auto" at d < K
    want = ops.reference_loss(h, loss_fn.weight.double(), y, 0.4, cosine_scale=16 / 5000)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_loss_keeps_bf16_features_and_returns_float32(cifar_frame):
    loss_fn = HAFrameLoss(cifar_frame)
    h = torch.randn(4, 100).to(torch.bfloat16).requires_grad_()
    out = loss_fn(h, torch.tensor([0, 1, 2, 3]))
    out.backward()
    assert out.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    ref = ops.reference_loss(h.detach().double(), loss_fn.weight.to(torch.bfloat16).double(),
                             torch.tensor([0, 1, 2, 3]), 0.4, similarity=loss_fn.similarity.double())
    assert out.item() == pytest.approx(ref.item(), rel=1e-3)


# ----------------------------------------------------------------------------- one frame, held once
def _unit_rows(K, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1)


FRAMES = {"cifar100-S": lambda: HAFrame.from_hierarchy(Hierarchy.builtin("cifar100"), 2.0),
          "K5000-d16-gram": lambda: _unit_rows(5000, 16)}


@pytest.mark.parametrize("frame", FRAMES, ids=str)
def test_checkpoint_of_model_and_loss_stores_the_frame_once(frame, tmp_path):
    """A loss built from the classifier reads the classifier's buffers: its state_dict is only the epoch,
    and model + loss in one file hold W (and S) once (they held two clones)."""
    clf = FixedFrameClassifier(FRAMES[frame]())
    model = HAFrameModel(mlp(4, 8), TransformationLayerII(8, clf.num_classes, clf.in_features, num_blocks=0), clf)
    loss_fn = HAFrameLoss(model.classifier, alpha=0.4)
    assert set(loss_fn.state_dict()) == {"_extra_state"} and list(loss_fn.buffers()) == []
    assert loss_fn.weight is clf.weight and loss_fn.similarity is clf.similarity
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, path)
    frame_bytes = sum(t.numel() * t.element_size() for t in (clf.weight, clf.similarity) if t is not None)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert path.stat().st_size < model_bytes + frame_bytes / 2  # a second copy would add frame_bytes


@pytest.mark.parametrize("frame", FRAMES, ids=str)
def test_shared_loss_follows_the_classifier_it_was_built_from(frame):
    """Loading another frame into the classifier (a resume) changes what the loss computes; the d x d gram
    of a large frame is derived again from the loaded weight."""
    clf = FixedFrameClassifier(FRAMES[frame]())
    loss_fn = HAFrameLoss(clf, alpha=0.4)
    K, d = clf.weight.shape
    other = FixedFrameClassifier(_unit_rows(K, d, seed=1))
    clf.load_state_dict(other.state_dict())
    assert torch.equal(clf.weight, other.weight)
    if clf.similarity is None:
        assert clf.gram is not None and torch.allclose(clf.gram, other.gram)
    h = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, K, (6,))
    want = ops.reference_loss(h, other.weight.double(), y, 0.4, cosine_scale=min(d, K) / K)  # "auto"
    assert loss_fn(h, y).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["from-classifier", "standalone"])
def test_old_loss_state_with_its_own_weight_and_similarity_still_loads(cifar_frame, shared):
    """Checkpoints written while the loss cloned the frame hold 'weight' and 'similarity' in its state."""
    clf = FixedFrameClassifier(cifar_frame)
    old = {"weight": clf.weight.clone(), "similarity": clf.similarity.clone(), "_extra_state": {"epoch": 3}}
    loss_fn = HAFrameLoss(clf if shared else HAFrame.etf(100), alpha=0.4)
    loss_fn.load_state_dict(old)
    assert loss_fn.epoch == 3
    assert torch.equal(loss_fn.weight, clf.weight) and torch.equal(loss_fn.similarity, clf.similarity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K,d", [(5, 7), (4200, 12)], ids=["K5-d7", "K4200-d12"])
def test_modules_built_from_an_inference_mode_weight_train(dtype, K, d):
    with torch.inference_mode():
        w = _unit_rows(K, d, seed=2).to(dtype)
        clf = FixedFrameClassifier(w)
    loss_fn = HAFrameLoss(clf, alpha=0.4)
    h = torch.randn(5, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, K, (5,))
    loss = loss_fn(h, y) + clf(h).sum()
    loss.backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("bad", ["0.3", True, None, 0.3 + 0j])
def test_loss_module_refuses_an_alpha_that_is_not_a_real_number(bad):
    with pytest.raises(TypeError, match="alpha must be a real number"):
        HAFrameLoss(torch.eye(3), alpha=bad)


@pytest.mark.parametrize("schedule", ["cosine", "cosine-linear", "linear-increase"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "3", 0, -2.0, True])
def test_schedule_refuses_a_period_or_total_that_is_not_a_finite_positive_number(schedule, bad):
    """A NaN period used to pass the check and give alpha = 0 at every epoch (the NaN clipped to 0)."""
    kw = {"period": 2.0, "total_epochs": 10}
    kw["period" if schedule.startswith("cosine") else "total_epochs"] = bad
    with pytest.raises(ValueError, match="finite period > 0|total_epochs > 0"):
        alpha_at(schedule, 0.4, 1, **kw)
    with pytest.raises(ValueError, match="finite period > 0|total_epochs > 0"):
        HAFrameLoss(torch.eye(3), schedule=schedule, **kw)
