"""haframe_ext::fused_loss tested as PyTorch tests its own ops: torch.library.opcheck with every default check over
generated samples (known gaps in opcheck_failures.json), the fake kernel's errors against the C++ op's, and the
Python constants against the C++ ones."""

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import haframe_ext as hx
from haframe_ext import ops
from haframe_ext.ops import fused
from helpers import make_inputs

pytestmark = pytest.mark.skipif(not hx.native_available(), reason="compiled extension not built")

ROOT = Path(__file__).resolve().parents[1]
FAILURES = json.loads((Path(__file__).parent / "opcheck_failures.json").read_text())["fused_loss"]
DEFAULT_CHECKS = {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
GRADS = ("grad", "nograd")  # features.requires_grad and need_grad together, as haframe_loss passes them


@dataclass(frozen=True)
class Sample:
    """One call of the op: route, dtype, gradient mode, reduction, labels and shape (B, K, d)."""
    route: str  # "similarity" (gather route) or "gram" (M route)
    dtype: str
    grad: str  # "grad", "nograd", "grad_without_need_grad" or "need_grad_without_grad"
    reduction: str
    labels: str = "one_ignored"  # row 1 ignored; "class_as_ignore": ignore_index 2 is a class; "all_ignored"
    shape: tuple = (5, 4, 6)

    @property
    def id(self):
        return "{}-{}-{}-{}-{}-B{}K{}d{}".format(self.route, self.dtype, self.grad, self.reduction, self.labels,
                                                 *self.shape)

    def args(self, device):
        """The op's nine arguments on device."""
        dtype = DTYPES[self.dtype]
        h, w, y = make_inputs(*self.shape, dtype, device, seed=5)
        ignore_index = 2 if self.labels == "class_as_ignore" else -100
        if self.labels == "class_as_ignore" and self.shape[0] > 2:
            y[1] = ignore_index
        if self.labels == "all_ignored":
            y[:] = ignore_index
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        wa = w.to(acc)
        sim, gram = (wa @ wa.T, None) if self.route == "similarity" else (None, (wa.T @ wa).contiguous())
        requires_grad = self.grad in ("grad", "grad_without_need_grad")
        need_grad = self.grad in ("grad", "need_grad_without_grad")
        return (h.requires_grad_(requires_grad), w, y, sim, gram, 0.4, ignore_index, REDUCTIONS[self.reduction],
                need_grad)


def _special_samples():
    """Labels and gradient modes beyond the product: a class index as ignore_index, every row ignored, B = 0."""
    return [Sample("similarity", "f32", "grad", "mean", "class_as_ignore"),
            Sample("gram", "bf16", "grad", "sum", "class_as_ignore"),
            Sample("similarity", "f32", "grad", "mean", "all_ignored"),
            Sample("gram", "f64", "grad", "sum", "all_ignored"),
            Sample("similarity", "f32", "nograd", "none", shape=(0, 4, 6)),
            Sample("similarity", "f32", "nograd", "mean", shape=(0, 4, 6)),
            Sample("similarity", "f32", "grad_without_need_grad", "sum"),
            Sample("gram", "f32", "need_grad_without_grad", "mean")]


def quick_samples():
    """Each (route, dtype, gradient mode) once, the reductions in turn so that each meets every route and mode."""
    product = itertools.product(("similarity", "gram"), DTYPES, GRADS)
    reductions = list(REDUCTIONS)
    return [Sample(r, dt, g, reductions[i % 3]) for i, (r, dt, g) in enumerate(product)] + _special_samples()


def exhaustive_samples():
    """The full product over routes, dtypes, gradient modes and reductions, in three shapes (K < d, K > d, B = 1)."""
    shapes = [(5, 4, 6), (7, 20, 6), (1, 3, 3)]
    product = itertools.product(("similarity", "gram"), DTYPES, GRADS, REDUCTIONS, shapes)
    return [Sample(r, dt, g, red, shape=s) for r, dt, g, red, s in product] + _special_samples()


def check_sample(sample, device):
    """opcheck with its default checks; each fails only where opcheck_failures.json says so, with a reason."""
    result = torch.library.opcheck(torch.ops.haframe_ext.fused_loss.default, sample.args(device),
                                   raise_exception=False)
    assert DEFAULT_CHECKS <= set(result), sorted(result)
    known = FAILURES.get(sample.id, {})
    unexpected = {k: v for k, v in result.items() if v != "SUCCESS" and k not in known}
    stale = [k for k in known if result[k] == "SUCCESS"]
    assert not unexpected, f"{sample.id}: {unexpected}"
    assert not stale, f"{sample.id}: {stale} pass now: remove them from opcheck_failures.json"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", quick_samples(), ids=lambda s: s.id)
def test_opcheck_fused_loss(sample, device):
    check_sample(sample, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fused_loss_exhaustive(device):
    for sample in exhaustive_samples():
        check_sample(sample, device)


def test_failures_file_names_only_generated_samples_with_reasons():
    ids = {s.id for s in exhaustive_samples()} | {s.id for s in quick_samples()}
    assert set(FAILURES) <= ids, sorted(set(FAILURES) - ids)
    for sample_id, gaps in FAILURES.items():
        assert gaps and set(gaps) <= DEFAULT_CHECKS, sample_id
        assert all(isinstance(r, str) and len(r) > 20 for r in gaps.values()), sample_id
    assert {s.id for s in quick_samples()} >= set(FAILURES)  # every gap is re-checked by the quick set


def test_all_ignored_mean_is_nan_when_traced():
    """The gap opcheck_failures.json names: eager and AOT-traced outputs agree (both NaN) when nothing counts."""
    for sample in (Sample("similarity", "f32", "nograd", "mean", "all_ignored"),
                   Sample("similarity", "f32", "nograd", "mean", shape=(0, 4, 6))):
        h, *rest = sample.args("cpu")

        def fn(x, rest=rest):
            return torch.ops.haframe_ext.fused_loss(x, *rest)[0]

        eager = fn(h)
        traced = torch.compile(fn, fullgraph=True, backend="aot_eager")(h)
        assert torch.isnan(eager) and torch.isnan(traced), sample.id


# ----------------------------------------------------------------------------- the fake kernel's errors
def _bad_inputs():
    """(id, the op's arguments) for each input check of csrc/fused_loss_checks.h, in its order."""
    h, w, y = make_inputs(5, 4, 6, torch.float32, "cpu", seed=1)
    S, M = w @ w.T, w.T @ w
    ok = (h, w, y, S, None, 0.4, -100, 1, False)
    cases = {
        "features-1d": (h[0],) + ok[1:],
        "weight-3d": (h, w[None]) + ok[2:],
        "weight-d": (h, torch.randn(4, 7)) + ok[2:],
        "no-classes": (h, w[:0], y, S[:0, :0]) + ok[4:],
        "dtype-mismatch": (h, w.double()) + ok[2:],
        "float-target": (h, w, y.float()) + ok[3:],
        "target-length": (h, w, y[:3]) + ok[3:],
        "alpha": ok[:5] + (1.5,) + ok[6:],
        "reduction": ok[:7] + (3, False),
        "both-routes": (h, w, y, S, M) + ok[5:],
        "no-route": (h, w, y, None, None) + ok[5:],
        "similarity-shape": (h, w, y, S[:3]) + ok[4:],
        "similarity-dtype": (h, w, y, S.double()) + ok[4:],
        "gram-shape": (h, w, y, None, S) + ok[5:],
    }
    return list(cases.items())


def _cpp_error(args):
    with pytest.raises((ValueError, TypeError)) as cpp:
        torch.ops.haframe_ext.fused_loss(*args)
    return cpp.value


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_fake_kernel_raises_the_cpp_error(case):
    """Fake tensors (torch.compile's tracing) meet the same check, error type and message as the C++ op."""
    args = case[1]
    cpp = _cpp_error(args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(type(cpp)) as faked:
            torch.ops.haframe_ext.fused_loss(*fake)
    assert str(faked.value) == str(cpp)


@pytest.mark.parametrize("case", [c for c in _bad_inputs() if c[0] in ("weight-d", "target-length", "gram-shape")],
                         ids=lambda c: c[0])
def test_compiled_call_reports_the_cpp_error(case):
    args = case[1]
    cpp = _cpp_error(args)
    fn = torch.compile(lambda h: torch.ops.haframe_ext.fused_loss(h, *args[1:])[0], fullgraph=True, backend="eager",
                       dynamic=False)  # static: the message names the sizes, not symbols
    with pytest.raises(Exception) as compiled:
        fn(args[0])
    assert repr(cpp) in str(compiled.value)


# ----------------------------------------------------------------------------- constants shared with C++
def _cpp_constant(header, name):
    """The value of ``constexpr <type> name = <value>;`` in a csrc header, evaluated (numbers, int64_t(x) << n)."""
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([^;]+);", (ROOT / header).read_text())
    assert m, f"{name} not found in {header}"
    return eval(re.sub(r"int64_t\((\d+)\)", r"\1", m.group(1)), {})  # a literal, or a literal shifted


def test_python_constants_match_the_cpp_ones():
    assert ops.EPS == _cpp_constant("csrc/haframe_math.h", "kEps")
    assert ops.UNIT_ROW_TOL == _cpp_constant("csrc/fused_loss_checks.h", "kUnitRowTol")
    enum = re.search(r"enum Reduction : int64_t \{([^}]*)\}", (ROOT / "csrc/fused_loss_checks.h").read_text())
    codes = {name.lower(): int(v) for name, v in re.findall(r"k(\w+)\s*=\s*(\d+)", enum.group(1))}
    assert codes == fused._REDUCTION_CODE == {"none": 0, "mean": 1, "sum": 2}
    emulated = pytest.importorskip("cuda_emu.emulated")  # the CUDA host's replay uses the same numbers
    assert emulated.EPS == ops.EPS
    assert emulated.CHUNK_BYTES == _cpp_constant("csrc/cuda/fused_loss_host.cpp", "kCudaChunkBytes")
