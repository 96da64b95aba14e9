"""pytest-benchmark: forward+backward of the HAFrame loss, providers side by side per shape.

    python -m pytest bench/test_bench_loss.py --benchmark-only --benchmark-group-by=group -q \
        --benchmark-json=bench/cpu_bench.json

(pyproject's addopts carry ``--benchmark-skip``; ``--benchmark-only`` overrides it.) Each benchmark's
group is its device and shape, so the providers of one shape appear in one table. Closures come from
bench/providers.py: built (compiled, caches filled, warmed up) once per (device, shape, provider)
outside the timed region; on CUDA each timed call ends with ``torch.cuda.synchronize``. Every
benchmark also records, in ``extra_info`` (so in the JSON), the peak extra memory of one step
(bench/memory.py states the method), what the provider covers, and whether TF32 was on.
CUDA parameters are skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from bench import memory as MEM
from bench import providers as P

CUDA = torch.cuda.is_available()

# (rounds, warmup_rounds) per shape; slow providers get fewer rounds (a few seconds each at most)
ROUNDS = {
    ("cpu", "cifar"): (300, 20),
    ("cpu", "inat"): (40, 3),
    ("cpu", "large"): (10, 1),
    ("cpu", "k100k"): (5, 1),
    ("cuda", "inat"): (200, 10),
    ("cuda", "sq4096_bf16"): (30, 3),
    ("cuda", "sq4096_fp32"): (20, 3),
    ("cuda", "k100k_bf16"): (10, 2),
}
# the paper loop takes seconds per step at K=1010 on CPU (1010 autograd subgraphs)
SLOW_ROUNDS = {"paper_loop": {("cpu", "cifar"): (40, 2), ("cpu", "inat"): (9, 0), ("cuda", "inat"): (10, 1)}}

CPU_PROVIDERS = ("fused", "fused_ce", "eager", "compiled", "paper_loop", "torch_lce", "torch_lce_chunked", "gemm2")
GPU_PROVIDERS = ("fused", "fused_ce", "fused_tuned", "fused_graph", "eager", "eager_graph", "compiled", "paper_loop",
                 "sdpa", "liger", "torch_lce", "torch_lce_chunked", "gemm2")
# providers kept as parameters on a torch that lacks them, so they show up as skipped with the reason
SKIP_VISIBLY = ("torch_lce", "torch_lce_chunked")


def _params():
    out = []
    for shape in P.CPU_SHAPES.values():
        for prov in CPU_PROVIDERS:
            if P.applicable(prov, shape, "cpu") is None or prov in SKIP_VISIBLY:
                out.append(pytest.param("cpu", shape, prov, id=f"cpu-{shape.name}-{prov}"))
    for shape in P.GPU_SHAPES.values():
        for prov in GPU_PROVIDERS:
            if prov == "paper_loop" and shape.K > P.PAPER_MAX_K:
                continue
            out.append(pytest.param("cuda", shape, prov, id=f"cuda-{shape.name}-{prov}",
                                    marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]))
    return out


_CASES: dict = {}
_FNS: dict = {}


def _case(device: str, shape: P.Shape) -> P.Case:
    key = (device, shape.name)
    if key not in _CASES:
        # one shape's tensors resident at a time (matters for the large GPU shapes)
        for k in [k for k in _CASES if k != key]:
            del _CASES[k]
            for f in [f for f in _FNS if f[:2] == k]:
                del _FNS[f]
        if device == "cuda":
            torch.cuda.empty_cache()
        _CASES[key] = P.make_case(shape, device)
    return _CASES[key]


def _closure(device: str, shape: P.Shape, provider: str):
    key = (device, shape.name, provider)
    case = _case(device, shape)
    if key not in _FNS:
        try:
            _FNS[key] = P.build(provider, case)
        except P.Skip as exc:
            _FNS[key] = exc
    fn = _FNS[key]
    if isinstance(fn, P.Skip):
        pytest.skip(str(fn))
    return case, fn


def _tf32(device: str, dtype: torch.dtype) -> str:
    from bench.run_quick import tf32_label

    return tf32_label(torch.device(device), dtype)


@pytest.mark.parametrize("device,shape,provider", _params())
def test_loss_fwd_bwd(benchmark, device, shape, provider):
    case, fn = _closure(device, shape, provider)
    benchmark.group = f"{device}: {shape.label}"
    rounds, warmup = SLOW_ROUNDS.get(provider, {}).get((device, shape.name), ROUNDS[(device, shape.name)])
    benchmark.extra_info.update({
        "shape": shape.name, "B": shape.B, "K": shape.K, "d": shape.d,
        "dtype": str(shape.dtype).replace("torch.", ""), "device": device, "provider": provider,
        "covers": "CE+cos" if provider in P.FULL_LOSS else ("CE only" if provider in P.CE_ONLY else "2 GEMMs"),
        "note": P.provider_note(provider, shape), "tf32": _tf32(device, shape.dtype),
        "threads": torch.get_num_threads(),
    })
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    benchmark.extra_info["peak_extra_bytes"] = MEM.peak_extra(fn, case.device, case, warmup=provider != "paper_loop")
    benchmark.extra_info["memory_method"] = MEM.MEMORY_METHOD[case.device.type]


# ----------------------------------------------------------------------------- sanity (not a benchmark)
@pytest.mark.parametrize("shape,providers", [("cifar", ("fused", "paper_loop", "eager")),
                                             ("inat", ("fused", "eager")),
                                             ("large", ("fused", "eager"))])
def test_providers_compute_the_same_gradient(shape, providers):
    """The timed closures compute the same loss: fused (and the paper loop) agree with eager on h.grad."""
    case = P.make_case(P.CPU_SHAPES[shape], "cpu")
    errs = P.check_agreement(case, providers=providers)
    assert max(errs.values()) < 1e-4, errs


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_providers_compute_the_same_gradient():
    """On CUDA the default and the tuned fused paths agree with eager on h.grad."""
    case = P.make_case(P.GPU_SHAPES["inat"], "cuda")
    errs = P.check_agreement(case, providers=("fused", "fused_tuned", "fused_graph", "eager"))
    assert max(errs.values()) < 1e-4, errs


LCE = ("torch_lce", "torch_lce_chunked")


@pytest.mark.parametrize("shape", list(P.CPU_SHAPES))
@pytest.mark.parametrize("provider", LCE)
def test_torch_lce_equals_reference_ce(shape, provider):
    """F.linear_cross_entropy (reference and chunked) gives the CE of h W^T and its h.grad, as haframe_loss at
    alpha=0."""
    why = P.lce_available()
    if why:
        pytest.skip(why)
    import torch.nn.functional as F

    from haframe_ext.ops import haframe_loss

    case = P.make_case(P.CPU_SHAPES[shape], "cpu")
    h, W, y = case.h, case.W, case.y
    opts = P.lce_options(provider == "torch_lce_chunked")
    h.grad = None
    loss = F.linear_cross_entropy(h, W, y, options=opts)
    loss.backward()
    got, grad = loss.item(), h.grad.clone()
    h.grad = None
    ref = F.cross_entropy(h @ W.T, y)  # plain-PyTorch reference
    ref.backward()
    ref_grad = h.grad.clone()
    h.grad = None
    ce0 = haframe_loss(h.detach(), W, y, 0.0).item()  # the fused op's CE part alone
    assert abs(got - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (got, ref.item())
    assert abs(got - ce0) <= 1e-5 * max(1.0, abs(ce0)), (got, ce0)
    assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-4
    assert W.grad is None
