"""Benchmark providers for the HAFrame loss: closures doing one forward+backward step.

Every provider is a builder ``build(case, alpha) -> callable`` where ``case`` is a :class:`Case`
(features with ``requires_grad``, a frozen weight, labels, and the frame's similarity when it is
small enough to keep). The returned closure runs forward+backward once (the gradient lands in
``case.h.grad``, which it resets first) and, on CUDA, synchronises before returning so that a wall
clock around it measures the device work. Builders do all one-off work (compilation, caches,
kernel-selection probes) and a warm-up call before returning, so nothing of that is timed.

Providers (``PROVIDERS``):

- ``fused_tuned`` (CUDA only): ``fused`` with ``HAFRAME_CUDA_TUNED=1`` set around each call (the tuned
  CUDA path: vector epilogue with the correction folded in, one-kernel inverse norms); off by default
  in the library until it has passed the CUDA tests on a GPU.
- ``fused_graph`` (CUDA only): the ``fused`` step (forward + backward) captured once in a CUDA graph and
  replayed per call (what ``torch.compile(mode="reduce-overhead")`` or a captured training step gives):
  the device's own time, without the per-call host work. The default CUDA path.
- ``eager_graph`` (CUDA only): the eager loss's step captured and replayed the same way (the fair
  comparison for ``fused_graph``).
- ``fused``: ``haframe_ext.haframe_loss`` called as ``HAFrameLoss`` calls it: the frame's similarity
  ``S`` (K x K, K <= S_MAX_K) or, for the large low-dimensional frames, the d x d gram ``M = W^T W``
  (the M route) is computed once here and passed in, see ``build_fused``.
- ``fused_ce``: ``fused`` with ``alpha=0``, cross entropy only: the like-for-like row beside torch's
  ``F.linear_cross_entropy`` (on the CPU the op then computes the cross entropy alone; the CUDA kernels still
  compute the cosine quantities and weigh them by zero).
- ``eager``: the straightforward vectorised PyTorch loss
  ``(1-a) CE(h W^T, y) + a mean_b sum_k (cos(h_b, w_k) - S[y_b, k])^2`` with ``F.normalize``.
  ``S`` is precomputed once when the shape keeps it (K <= ``S_MAX_K``); for the large low-dim frame the
  target row ``S[y]`` is computed per step as ``W[y] @ W^T`` (a B x d x K GEMM, as a user without a
  K x K matrix would write it).
- ``paper_loop``: ``haframe_ext.ops.paper_loss``, the paper code's per-class Python loop (K <= 1010).
- ``compiled``: ``torch.compile`` of the eager loss function (default mode, ``dynamic=False``),
  compiled and warmed up once in the builder.
- ``sdpa`` (CUDA only): the cross-entropy part only. ``W^T softmax(W h)`` is attention with
  query ``h`` and keys = values = the class vectors, so one ``scaled_dot_product_attention`` forward
  gives the CE gradient ``dCE/dh = W^T p - w_y`` without a B x K matrix when a fused SDPA kernel takes
  the shape. The closure computes the CE loss value (``lse - z_y``, with ``lse`` from the memory-
  efficient kernel when it runs, else ``torch.logsumexp`` of the logits) and the CE gradient
  ``(attn_out - W[y]) / B`` as the gradient of ``h``; it does NOT compute the cosine term. The kernel
  that ran is reported in ``provider_note``.
- ``liger`` (CUDA only, needs ``liger_kernel``): Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
  with the frozen weight, cross entropy only (no cosine term). Skipped when not importable.
- ``torch_lce`` / ``torch_lce_chunked``: PyTorch's own ``F.linear_cross_entropy(h, W, y)`` (new in torch 2.13),
  cross entropy only (no cosine term): what a user would pick instead of the fused loss. ``torch_lce`` is its
  reference path (``options=None``: ``linear`` then ``cross_entropy``); ``torch_lce_chunked`` passes
  ``options=LinearCrossEntropyOptions()`` (batch chunks, gradient computed in forward, no B x K logits at
  once; the resolved chunk size and policy are in ``provider_note``). The builder checks the loss once
  against ``F.cross_entropy(h @ W.T, y)``. Skipped on a torch without it.
- ``gemm2`` (reference row, not a loss): the two unavoidable GEMMs alone, ``Z = h W^T`` and
  ``Z W``, with torch.mm and no autograd: the lower bound the fused op is compared with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from haframe_ext.sizes import DENSE_MAX_K

ALPHA = 0.4
S_MAX_K = DENSE_MAX_K  # keep the K x K similarity for the eager/compiled/paper providers up to this K
PAPER_MAX_K = 1010


class Skip(Exception):
    """A provider does not apply to this shape / device (the message says why)."""


# ----------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    K: int
    d: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # the device the shape is meant for ("cpu" or "cuda")

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.name} (B={self.B}, K={self.K}, d={self.d}, {dt})"


CPU_SHAPES: Dict[str, Shape] = {
    "cifar": Shape("cifar", 64, 100, 100),
    "inat": Shape("inat", 256, 1010, 1010),
    "large": Shape("large", 1024, 10000, 512),
    # many classes: a 4 MiB block would hold 10 rows, so the CPU op runs 64 MiB blocks one at a time
    "k100k": Shape("k100k", 256, 100000, 512),
}

GPU_SHAPES: Dict[str, Shape] = {
    "inat": Shape("inat", 256, 1010, 1010, torch.float32, "cuda"),
    "sq4096_bf16": Shape("sq4096_bf16", 8192, 4096, 4096, torch.bfloat16, "cuda"),
    "sq4096_fp32": Shape("sq4096_fp32", 8192, 4096, 4096, torch.float32, "cuda"),
    "k100k_bf16": Shape("k100k_bf16", 8192, 100000, 512, torch.bfloat16, "cuda"),
}


def shapes_for(spec: str) -> List[Shape]:
    """'cpu', 'gpu', or a comma list of names from either table (CPU table first)."""
    if spec == "cpu":
        return list(CPU_SHAPES.values())
    if spec == "gpu":
        return list(GPU_SHAPES.values())
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name in CPU_SHAPES:
            out.append(CPU_SHAPES[name])
        elif name in GPU_SHAPES:
            out.append(GPU_SHAPES[name])
        else:
            raise ValueError(f"unknown shape {name!r}; known: {sorted(set(CPU_SHAPES) | set(GPU_SHAPES))}")
    return out


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Case:
    shape: Shape
    device: torch.device
    h: torch.Tensor  # [B, d] leaf, requires_grad
    W: torch.Tensor  # [K, d] frozen, unit rows, dtype of h
    y: torch.Tensor  # [B] int64
    S: Optional[torch.Tensor]  # [K, K] float32 (W W^T) when K <= S_MAX_K, else None


def make_case(shape: Shape, device=None, seed: int = 0) -> Case:
    """Random unit-row frame (S = W W^T, exact for timing purposes), Gaussian features, uniform labels."""
    dev = torch.device(device if device is not None else shape.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = F.normalize(torch.randn(shape.K, shape.d, generator=g), dim=1)
    h = torch.randn(shape.B, shape.d, generator=g)
    y = torch.randint(0, shape.K, (shape.B,), generator=g)
    W = W.to(dev)
    S = (W @ W.T).contiguous() if shape.K <= S_MAX_K else None
    W = W.to(shape.dtype).contiguous()
    h = h.to(dev, shape.dtype).requires_grad_(True)
    return Case(shape, dev, h, W, y.to(dev), S)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(case: Case, loss_fn: Callable[[], torch.Tensor], warmup: int = 2) -> Callable[[], torch.Tensor]:
    """Wrap a loss thunk into forward+backward (+ CUDA sync) and warm it up ``warmup`` times."""
    h, dev = case.h, case.device

    def fn():
        h.grad = None
        loss = loss_fn()
        loss.backward()
        _sync(dev)
        return loss

    for _ in range(warmup):
        fn()
    return fn


# ----------------------------------------------------------------------------- the eager loss
def eager_loss(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, S: Optional[torch.Tensor], alpha: float):
    """Straightforward vectorised HAFrame loss: CE on h W^T plus the squared cosine residual to S[y]."""
    ce = F.cross_entropy(h @ W.T, y)
    target_sim = S[y] if S is not None else W[y] @ W.T  # [B, K]
    cos = F.normalize(h, dim=1) @ F.normalize(W, dim=1).T  # [B, K]
    lcos = ((cos - target_sim) ** 2).sum(1).mean()
    return (1.0 - alpha) * ce + alpha * lcos


# ----------------------------------------------------------------------------- builders
def build_fused(case: Case, alpha: float = ALPHA):
    from haframe_ext.ops import haframe_loss
    import haframe_ext

    if not haframe_ext.native_available():
        raise Skip(f"native extension unavailable: {haframe_ext.native_error()}")
    h, W, y = case.h, case.W, case.y
    if case.S is not None:  # as HAFrameLoss calls it: the frame's S, held once
        S = case.S.to(torch.float64 if h.dtype == torch.float64 else torch.float32).contiguous()
        return _step(case, lambda: haframe_loss(h, W, y, alpha, similarity=S, backend="native"))
    # large K, low-dim frame: the d x d gram (the M route), held once
    Wf = W.detach().float()
    gram = (Wf.T @ Wf).contiguous()
    return _step(case, lambda: haframe_loss(h, W, y, alpha, gram=gram, backend="native"))


def build_fused_ce(case: Case, alpha: float = ALPHA):
    """``fused`` at alpha = 0 (cross entropy only), whatever alpha the run uses."""
    return build_fused(case, 0.0)


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set an environment variable for the duration of the block (the op reads it on every call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def build_fused_tuned(case: Case, alpha: float = ALPHA):
    if case.device.type != "cuda":
        raise Skip("the tuned path is CUDA-only")
    with _env("HAFRAME_CUDA_TUNED", "1"):
        fn = build_fused(case, alpha)  # warmed up on the tuned path

    def tuned():
        with _env("HAFRAME_CUDA_TUNED", "1"):
            return fn()

    return tuned


def _graph_step(case: Case, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Forward + backward of ``loss_fn`` captured once in a CUDA graph (after a warm-up on a side stream);
    the closure replays it: the device's own time, without per-step host work."""
    if case.device.type != "cuda":
        raise Skip("CUDA graphs are CUDA-only")
    h = case.h
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            h.grad = None
            loss_fn().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    h.grad = None
    with torch.cuda.graph(graph):
        loss = loss_fn()
        loss.backward()

    def fn():
        graph.replay()
        _sync(case.device)
        return loss

    fn()
    return fn


def build_fused_graph(case: Case, alpha: float = ALPHA):
    from haframe_ext.ops import haframe_loss

    h, W, y = case.h, case.W, case.y
    kw = {}
    if case.S is None:
        Wf = W.detach().float()
        kw["gram"] = (Wf.T @ Wf).contiguous()
    return _graph_step(case, lambda: haframe_loss(h, W, y, alpha, backend="native", **kw))


def build_eager_graph(case: Case, alpha: float = ALPHA):
    h, W, y, S = case.h, case.W, case.y, case.S
    if S is not None:
        S = S.to(h.dtype)
    return _graph_step(case, lambda: eager_loss(h, W, y, S, alpha))


def build_eager(case: Case, alpha: float = ALPHA):
    h, W, y, S = case.h, case.W, case.y, case.S
    if S is not None:
        S = S.to(h.dtype)
    return _step(case, lambda: eager_loss(h, W, y, S, alpha))


def build_paper_loop(case: Case, alpha: float = ALPHA):
    from haframe_ext.ops import paper_loss

    if case.shape.K > PAPER_MAX_K:
        raise Skip(f"paper loop only for K <= {PAPER_MAX_K} (K={case.shape.K})")
    h, W, y = case.h, case.W, case.y
    S = case.S.to(h.dtype)
    return _step(case, lambda: paper_loss(h, W, y, alpha, similarity=S), warmup=1)  # seconds per call at K=1010


def build_compiled(case: Case, alpha: float = ALPHA):
    h, W, y, S = case.h, case.W, case.y, case.S
    if S is not None:
        S = S.to(h.dtype)
    compiled = torch.compile(eager_loss, dynamic=False)
    return _step(case, lambda: compiled(h, W, y, S, alpha))


# -- sdpa: the CE part as attention
_SDPA_NOTES: Dict[Tuple, str] = {}


class _SdpaCE(torch.autograd.Function):
    """CE loss (mean) whose gradient w.r.t. h is computed in forward by SDPA: (W^T p - w_y) / B."""

    @staticmethod
    def forward(ctx, h, W, y, mode):
        q, k = h[None, None], W[None, None]  # [1, 1, B, d], [1, 1, K, d]
        wy = W.index_select(0, y)
        if mode == "efficient":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True, scale=1.0)[:2]
            lse = lse.reshape(-1)[: h.shape[0]].float()
        else:  # public API, whichever kernel it picks; lse from the logits
            out = F.scaled_dot_product_attention(q, k, k, scale=1.0)
            lse = torch.logsumexp((h @ W.T).float(), dim=1)
        zy = (h.float() * wy.float()).sum(1)
        B = h.shape[0]
        ctx.save_for_backward(((out[0, 0] - wy) / B).to(h.dtype))
        return (lse - zy).mean()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def build_sdpa(case: Case, alpha: float = ALPHA):
    if case.device.type != "cuda":
        raise Skip("sdpa provider is CUDA-only")
    h, W, y = case.h, case.W, case.y
    mode = "efficient"
    try:  # probe the memory-efficient kernel (returns the logsumexp, no B x K matrix) and check its loss
        with torch.no_grad():
            n = min(h.shape[0], 256)
            hs, ys = h.detach()[:n].contiguous(), y[:n]
            got = _SdpaCE.apply(hs, W, ys, "efficient").item()
            want = F.cross_entropy((hs @ W.T).float(), ys).item()
        _sync(case.device)
        if not abs(got - want) <= 2e-2 * max(1.0, abs(want)):
            raise RuntimeError(f"efficient-kernel CE {got:.5f} != cross_entropy {want:.5f}")
        note = "mem-efficient SDPA kernel (aten._scaled_dot_product_efficient_attention), CE only"
    except Exception as exc:  # alignment / head-dim limits, or a mismatch
        mode = "public"
        note = f"F.scaled_dot_product_attention default dispatch (efficient kernel refused: {str(exc)[:80]}); " \
               "lse via logsumexp(B x K); CE only"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with torch.no_grad():
                q, k = h.detach()[None, None], W[None, None]
                for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                           SDPBackend.MATH):
                    try:
                        with sdpa_kernel([be]):
                            F.scaled_dot_product_attention(q, k, k, scale=1.0)
                        note += f"; first kernel accepting the shape: {be.name}"
                        break
                    except Exception:
                        continue
        except Exception:
            pass
    _SDPA_NOTES[(case.shape.name,)] = note
    return _step(case, lambda: _SdpaCE.apply(h, W, y, mode))


def liger_loss_class():
    """LigerFusedLinearCrossEntropyLoss, imported lazily; raises Skip when liger_kernel is missing."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        raise Skip(f"liger_kernel not importable ({type(exc).__name__}: {str(exc)[:80]}); "
                   "install it with pip install --no-deps .whl/liger_kernel-*.whl") from None
    return LigerFusedLinearCrossEntropyLoss


def build_liger(case: Case, alpha: float = ALPHA):
    if case.device.type != "cuda":
        raise Skip("liger provider is CUDA-only (Triton kernels)")
    cls = liger_loss_class()
    loss_fn = cls(reduction="mean")
    h, W, y = case.h, case.W, case.y
    assert not W.requires_grad
    return _step(case, lambda: loss_fn(W, h, y))


# -- torch_lce: PyTorch's F.linear_cross_entropy (torch >= 2.13), CE only
_LCE_NOTES: Dict[Tuple, str] = {}
LCE_CHECK_ROWS = 1024  # rows of the one-off loss check against F.cross_entropy(h @ W.T, y)


def lce_available() -> Optional[str]:
    """None if this torch has F.linear_cross_entropy and LinearCrossEntropyOptions, else why not."""
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (new in 2.13)"
    try:
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions  # noqa: F401
    except Exception as exc:
        return f"torch {torch.__version__} lacks LinearCrossEntropyOptions ({type(exc).__name__})"
    return None


def lce_options(chunked: bool):
    """``LinearCrossEntropyOptions()`` (all defaults: auto chunk size and policy) or None (reference path)."""
    if not chunked:
        return None
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    return LinearCrossEntropyOptions()


def lce_check(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, options) -> Tuple[float, float]:
    """(F.linear_cross_entropy, F.cross_entropy(h @ W.T, y)) in float64 on the first LCE_CHECK_ROWS rows."""
    n = min(h.shape[0], LCE_CHECK_ROWS)
    hs, ys = h.detach()[:n].contiguous(), y[:n]
    with torch.no_grad():  # the chunked path computes its gradient in forward only when grad is on
        got = F.linear_cross_entropy(hs, W, ys, options=options).double().item()
        want = F.cross_entropy((hs @ W.T).double(), ys).item()  # plain-PyTorch reference
    return got, want


def _build_lce(case: Case, chunked: bool):
    why = lce_available()
    if why:
        raise Skip(why)
    import warnings

    h, W, y = case.h, case.W, case.y
    assert not W.requires_grad  # gradient w.r.t. the features only, as for every provider
    options = lce_options(chunked)
    got, want = lce_check(h, W, y, options)
    tol = 1e-4 if h.dtype in (torch.float32, torch.float64) else 2e-2
    if not abs(got - want) <= tol * max(1.0, abs(want)):
        raise RuntimeError(f"F.linear_cross_entropy {got:.6f} != F.cross_entropy(h @ W.T, y) {want:.6f}")
    with warnings.catch_warnings(record=True) as caught:  # a fallback to the reference path warns
        warnings.simplefilter("always")
        fn = _step(case, lambda: F.linear_cross_entropy(h, W, y, options=options))
    note = f"F.linear_cross_entropy, CE only, checked == F.cross_entropy(h @ W.T, y) (diff {abs(got - want):.1e})"
    if chunked:
        note += "; options=LinearCrossEntropyOptions()"
        try:  # the chunk size and policy "auto" resolves to here (a private helper of the options class)
            r = options._adjust(h.shape[0], h.shape[1], W.shape[0], h.dtype, h.device)
            note += f": batch_chunk_size={r.batch_chunk_size} ({r.chunking_method}), acc_policy={r.acc_policy}"
        except Exception:
            pass
    else:
        note += "; options=None (reference path)"
    msgs = sorted({str(w.message)[:100] for w in caught})  # e.g. a fallback from the chunked path
    if msgs:
        note += "; warned: " + " | ".join(msgs[:2])
    _LCE_NOTES[(case.shape, chunked)] = note
    return fn


def build_torch_lce(case: Case, alpha: float = ALPHA):
    """``F.linear_cross_entropy(h, W, y)`` on its reference path (options=None); CE only."""
    return _build_lce(case, chunked=False)


def build_torch_lce_chunked(case: Case, alpha: float = ALPHA):
    """``F.linear_cross_entropy(h, W, y, options=LinearCrossEntropyOptions())``; CE only."""
    return _build_lce(case, chunked=True)


def build_gemm2(case: Case, alpha: float = ALPHA):
    """The two B x d x K GEMMs alone (logits, then logits-shaped G times W), no autograd."""
    h, W = case.h.detach(), case.W
    dev = case.device

    def fn():
        z = torch.mm(h, W.T)
        g = torch.mm(z, W)
        _sync(dev)
        return g

    fn()
    return fn


PROVIDERS: Dict[str, Callable] = {
    "fused": build_fused,
    "fused_ce": build_fused_ce,
    "fused_tuned": build_fused_tuned,
    "fused_graph": build_fused_graph,
    "eager_graph": build_eager_graph,
    "eager": build_eager,
    "compiled": build_compiled,
    "paper_loop": build_paper_loop,
    "sdpa": build_sdpa,
    "liger": build_liger,
    "torch_lce": build_torch_lce,
    "torch_lce_chunked": build_torch_lce_chunked,
    "gemm2": build_gemm2,
}

#: providers that compute the whole HAFrame loss (CE + cosine); the others cover less
FULL_LOSS = ("fused", "fused_tuned", "fused_graph", "eager_graph", "eager", "compiled", "paper_loop")
CE_ONLY = ("fused_ce", "sdpa", "liger", "torch_lce", "torch_lce_chunked")
REFERENCE_ROWS = ("gemm2",)


def applicable(provider: str, shape: Shape, device) -> Optional[str]:
    """None if ``provider`` applies to ``shape`` on ``device``, else the reason it is skipped."""
    dev = torch.device(device)
    if provider in ("sdpa", "liger", "fused_tuned", "fused_graph", "eager_graph") and dev.type != "cuda":
        return f"{provider} is CUDA-only"
    if provider == "paper_loop" and shape.K > PAPER_MAX_K:
        return f"paper loop only for K <= {PAPER_MAX_K}"
    if provider in ("torch_lce", "torch_lce_chunked"):
        why = lce_available()
        if why:
            return why
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA not available"
    return None


def build(provider: str, case: Case, alpha: float = ALPHA):
    """Build the closure for ``provider`` (raises Skip when it does not apply)."""
    why = applicable(provider, case.shape, case.device)
    if why:
        raise Skip(why)
    return PROVIDERS[provider](case, alpha)


def provider_note(provider: str, shape: Shape) -> str:
    if provider == "sdpa":
        return _SDPA_NOTES.get((shape.name,), "CE only")
    if provider == "liger":
        return "LigerFusedLinearCrossEntropyLoss, frozen weight, CE only"
    if provider in ("torch_lce", "torch_lce_chunked"):
        return _LCE_NOTES.get((shape, provider == "torch_lce_chunked"), "F.linear_cross_entropy, CE only")
    if provider == "gemm2":
        return "two torch.mm GEMMs alone (bound)"
    if provider == "fused_ce":
        return "fused op at alpha=0 (CE only)"
    if provider in ("fused_graph", "eager_graph"):
        return "CUDA graph replay of the whole step (its memory pool is taken at capture: peak extra ~0 per step)"
    if provider == "eager" and shape.K > S_MAX_K:
        return "S[y] computed per step as W[y] @ W.T"
    return ""


def gemm2_flops(shape: Shape) -> float:
    """FLOPs of the two unavoidable B x d x K GEMMs."""
    return 4.0 * shape.B * shape.K * shape.d


def check_agreement(case: Case, alpha: float = ALPHA, providers=("fused", "eager")) -> Dict[str, float]:
    """Max abs difference of h.grad between providers and eager (sanity: they compute the same loss)."""
    grads = {}
    for p in providers:
        fn = build(p, case, alpha)
        fn()
        grads[p] = case.h.grad.detach().float().clone()
    ref = grads[providers[-1]]
    scale = max(ref.abs().max().item(), 1e-30)
    return {p: (g - ref).abs().max().item() / scale for p, g in grads.items()}


__all__ = ["Shape", "Case", "Skip", "CPU_SHAPES", "GPU_SHAPES", "PROVIDERS", "FULL_LOSS", "CE_ONLY",
           "make_case", "shapes_for", "build", "applicable", "provider_note", "eager_loss", "gemm2_flops",
           "check_agreement", "liger_loss_class", "lce_available", "lce_options", "lce_check"]

