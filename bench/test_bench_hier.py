"""pytest-benchmark: forward+backward of HXE, soft labels and CE with a trainable classifier, providers side by side.

    python -m pytest bench/test_bench_hier.py --benchmark-only --benchmark-group-by=group -q \
        --benchmark-json=bench/hier_bench.json
    python -m bench.test_bench_hier table bench/hier_bench.json      # the markdown table with ratios

Providers per shape (one group per shape, so they share one table):
- ``fused_ce`` / ``fused_hxe`` / ``fused_soft``: ``haframe_ext.linear_hierarchical_loss`` (native op), weight
  trainable: logits, d features and d weight by three GEMMs per row chunk, never B x K at once.
- ``eager_hxe`` / ``eager_soft`` (K <= 1010): the same formulas written here with dense masks, as the published
  code does: two [K, K, depth] float masks of "class c lies under label y's ancestor at depth l + 1 / l" and a [K, K]
  soft-target matrix, built once outside the timed region; autograd does the backward.
- ``torch_lce`` / ``torch_lce_chunked``: torch's ``F.linear_cross_entropy`` (CE only), default call and
  ``LinearCrossEntropyOptions()`` (its chunked path), weight requiring grad.
Each step resets features.grad and weight.grad, so every provider allocates its gradients. Extra info: peak extra
memory of one step (bench/memory.py's profiler method, K <= 1010) or the peak RSS of a fresh process running
two steps (K = 10^5); TF32 does not apply on CPU.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import haframe_ext as hx
from haframe_ext import Hierarchy
from bench import memory as MEM

ALPHA, BETA = 0.1, 10.0
EAGER_MAX_K = 1010


@dataclass(frozen=True)
class HierShape:
    name: str
    B: int
    K: int
    d: int
    tree: str  # a builtin name or "random:K"


SHAPES = {
    "cifar": HierShape("cifar", 64, 100, 100, "cifar100"),
    "inat": HierShape("inat", 256, 1010, 1010, "inat19"),
    "k100k": HierShape("k100k", 256, 100000, 512, "random:100000"),
}
ROUNDS = {"cifar": (100, 5), "inat": (20, 2), "k100k": (3, 1)}
PROVIDERS = ("fused_ce", "fused_hxe", "fused_soft", "eager_hxe", "eager_soft", "torch_lce", "torch_lce_chunked")


def hierarchy(shape: HierShape) -> Hierarchy:
    if shape.tree.startswith("random:"):
        return Hierarchy.random(int(shape.tree.split(":")[1]))
    return Hierarchy.builtin(shape.tree)


def make_case(shape: HierShape, seed: int = 0):
    """(features [B, d] and weight [K, d] requiring grad, labels [B], hierarchy), seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.B, shape.d, generator=g).requires_grad_()
    W = (torch.randn(shape.K, shape.d, generator=g) / shape.d ** 0.5).requires_grad_()
    y = torch.randint(0, shape.K, (shape.B,), generator=g)
    return x, W, y, hierarchy(shape)


# ----------------------------------------------------------------------------- the eager dense-mask baselines
def dense_hxe_masks(h: Hierarchy, alpha: float = ALPHA):
    """(num, den [K, K, D] float32: class c under label y's ancestor at depth l + 1 (num) and l (den), the leaf below
    its own depth; weights [K, D]: w(v_{l+1}) / sum over nodes, 0 past the label's depth): the published layout."""
    K = h.num_classes
    names = h.nodes
    depth = np.array([h.depth(n) for n in names], dtype=np.float64)
    norm = np.exp(-alpha * depth).sum()
    D = h.max_depth
    under = {n: set() for n in names}
    for c, name in enumerate(h.classes):
        for a in [name] + h.ancestors(name):
            under[a].add(c)
    masks = np.zeros((K, K, D + 1), dtype=np.float32)
    weights = np.zeros((K, D), dtype=np.float32)
    for y, name in enumerate(h.classes):
        path = ([name] + h.ancestors(name))[::-1]  # root ... leaf
        for level in range(D + 1):
            masks[y, sorted(under[path[min(level, len(path) - 1)]]), level] = 1.0
            if 1 <= level < len(path):
                weights[y, level - 1] = np.exp(-alpha * level) / norm
    return torch.from_numpy(masks[:, :, 1:].copy()), torch.from_numpy(masks[:, :, :-1].copy()), \
        torch.from_numpy(weights)


def eager_hxe(x, W, y, num, den, weights):
    """HXE with dense masks: p(v) = sum_c p_c mask[y, c, l], loss = sum_l w_l -log(p(v_{l+1}) / p(v_l))."""
    p = torch.softmax(x @ W.T, dim=1)[:, :, None]  # [B, K, 1]
    pn = (p * num.index_select(0, y)).sum(1)  # [B, D]
    pd = (p * den.index_select(0, y)).sum(1)  # [B, D]
    return (weights.index_select(0, y) * -(torch.log(pn) - torch.log(pd))).sum(1).mean()


def dense_soft_targets(h: Hierarchy, beta: float = BETA):
    """[K, K] float32 soft-target matrix softmax(-beta d / d_max)."""
    d = torch.as_tensor(h.distances(), dtype=torch.float64)
    return torch.softmax(-beta * d / d.max(), dim=1).float()


def eager_soft(x, W, y, Q):
    return -(Q.index_select(0, y) * torch.log_softmax(x @ W.T, dim=1)).sum(1).mean()


# ----------------------------------------------------------------------------- providers
class Skip(Exception):
    pass


def build(provider: str, case):
    """A closure running one forward+backward step (gradients reset first)."""
    x, W, y, h = case
    if provider.startswith("fused_"):
        kind = {"ce": "cross-entropy", "hxe": "hxe", "soft": "soft-labels"}[provider[6:]]
        if not hx.native_available():
            raise Skip("compiled extension not built")
        loss = lambda: hx.linear_hierarchical_loss(x, W, y, h, kind, alpha=ALPHA, beta=BETA)  # noqa: E731
    elif provider.startswith("eager_"):
        if h.num_classes > EAGER_MAX_K:
            raise Skip(f"dense masks are K x K x depth: only up to K = {EAGER_MAX_K}")
        if provider == "eager_hxe":
            num, den, weights = dense_hxe_masks(h)
            loss = lambda: eager_hxe(x, W, y, num, den, weights)  # noqa: E731
        else:
            Q = dense_soft_targets(h)
            loss = lambda: eager_soft(x, W, y, Q)  # noqa: E731
    else:
        if not hasattr(F, "linear_cross_entropy"):
            raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
        opts = None
        if provider == "torch_lce_chunked":
            from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

            opts = LinearCrossEntropyOptions()
        loss = lambda: F.linear_cross_entropy(x, W, y, options=opts)  # noqa: E731

    def step():
        x.grad = W.grad = None
        out = loss()
        out.backward()
        return out

    step()
    return step


def _params():
    return [pytest.param(s, p, id=f"cpu-{s}-{p}") for s in SHAPES for p in PROVIDERS]


_CASE: dict = {}


def _case(shape: str):
    if shape not in _CASE:
        _CASE.clear()
        _CASE[shape] = make_case(SHAPES[shape])
    return _CASE[shape]


def peak_rss_bytes(shape: str, provider: str) -> int:
    """Peak RSS of a fresh process that builds the inputs and runs two steps of provider."""
    out = subprocess.run([sys.executable, "-m", "bench.test_bench_hier", "rss", shape, provider], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape,provider", _params())
def test_hier_fwd_bwd(benchmark, shape, provider):
    case = _case(shape)
    try:
        fn = build(provider, case)
    except Skip as exc:
        pytest.skip(str(exc))
    s = SHAPES[shape]
    benchmark.group = f"cpu: {shape} (B={s.B}, K={s.K}, d={s.d}), weight trainable"
    benchmark.extra_info.update({"shape": shape, "B": s.B, "K": s.K, "d": s.d, "provider": provider,
                                 "threads": torch.get_num_threads(), "tf32": "n/a (CPU)"})
    rounds, warmup = ROUNDS[shape]
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if s.K <= EAGER_MAX_K:
        x, W = case[0], case[1]
        x.grad = W.grad = None  # the step's own gradients are counted, for every provider alike
        benchmark.extra_info["peak_extra_bytes"] = MEM.peak_extra_cpu(fn, warmup=False)
        benchmark.extra_info["memory_method"] = MEM.MEMORY_METHOD["cpu"]
    else:
        benchmark.extra_info["peak_rss_bytes"] = peak_rss_bytes(shape, provider)
        benchmark.extra_info["memory_method"] = "ru_maxrss of a fresh process: inputs, tree, two steps"


# ----------------------------------------------------------------------------- sanity (not a benchmark)
@pytest.mark.parametrize("kind,eager", [("hxe", "eager_hxe"), ("soft-labels", "eager_soft")])
def test_eager_baselines_compute_the_fused_loss(kind, eager):
    """The bench's dense-mask baselines give the fused op's loss and gradients (so the timings compare like for
    like)."""
    x, W, y, h = make_case(SHAPES["cifar"])
    got = hx.linear_hierarchical_loss(x, W, y, h, kind, alpha=ALPHA, beta=BETA)
    g_got = torch.autograd.grad(got, (x, W))
    if eager == "eager_hxe":
        want = eager_hxe(x, W, y, *dense_hxe_masks(h))
    else:
        want = eager_soft(x, W, y, dense_soft_targets(h))
    g_want = torch.autograd.grad(want, (x, W))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- script: RSS probe and the table
def _rss_main(shape: str, provider: str) -> None:
    torch.set_num_threads(1)  # as the timed run on a shared machine; RSS does not depend on it
    fn = build(provider, make_case(SHAPES[shape]))
    fn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _table(path: str) -> None:
    """Markdown: per shape, each provider's median, its ratio to torch_lce and to fused_hxe, and its memory."""
    data = json.load(open(path))
    rows: dict = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows.setdefault(info["shape"], {})[info["provider"]] = (b["stats"]["median"], info)
    for shape, provs in rows.items():
        lce = provs.get("torch_lce", (None,))[0]
        hxe = provs.get("fused_hxe", (None,))[0]
        s = SHAPES[shape]
        print(f"\n{shape} (B={s.B}, K={s.K}, d={s.d})\n")
        print("| provider | median (ms) | / torch_lce | / fused_hxe | memory |")
        print("|---|---:|---:|---:|---:|")
        for p in PROVIDERS:
            if p not in provs:
                continue
            t, info = provs[p]
            mem = info.get("peak_extra_bytes", info.get("peak_rss_bytes"))
            label = "peak extra" if "peak_extra_bytes" in info else "peak RSS"
            print(f"| {p} | {t * 1e3:.1f} | {t / lce:.2f} | {t / hxe:.2f} | {label} {mem / 2**20:.1f} MiB |"
                  if lce and hxe else f"| {p} | {t * 1e3:.1f} | | | {mem} |")


if __name__ == "__main__":
    if sys.argv[1] == "rss":
        _rss_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "table":
        _table(sys.argv[2])
    else:
        raise SystemExit("usage: python -m bench.test_bench_hier rss SHAPE PROVIDER | table BENCH.json")
