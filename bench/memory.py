"""Peak extra memory of one forward+backward step of a provider.

"Peak extra" is the highest amount of memory allocated at any moment during the step, above what
was allocated just before it (inputs, the frozen frame, the cached S or M, compiled graphs: all
already resident and not counted; ``h.grad`` is reset to None first, so the gradient buffer IS
counted, for every provider alike).

- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated() -
  memory_allocated()`` measured before the step (the caching allocator's live-tensor bytes; cuBLAS
  workspaces are allocated through it too once per handle, and are already resident after warm-up).
- CPU: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free made through
  PyTorch's CPU allocator (``[memory]`` events with signed byte counts, from any thread the profiler
  follows); the running sum of those events in time order gives the live extra bytes, and its
  maximum is the peak. Memory that libraries allocate outside PyTorch's allocator (BLAS packing
  buffers, the OpenMP runtime) is not seen; it is the same for every provider using the same GEMMs.
  The profiler follows only the calling thread, not OpenMP workers, so the step is measured with
  ``torch.set_num_threads(1)`` (see ``peak_extra_cpu``).

Run as a script for a quick table: ``python -m bench.memory --device cpu --shapes cpu``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Optional

import torch

MEMORY_METHOD = {
    "cpu": "torch.profiler(profile_memory=True): max running sum of [memory] alloc/free events during one "
           "step, run with torch.set_num_threads(1) so that every allocation is on the profiled thread",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats, minus memory_allocated() before",
}


def _reset_grad(case) -> None:
    if case is not None:
        case.h.grad = None


def peak_extra_cpu(fn: Callable[[], object], case=None, threads: Optional[int] = 1, warmup: bool = True) -> int:
    """Peak extra bytes allocated by PyTorch's CPU allocator while ``fn()`` runs (profiler method).

    The profiler follows the calling thread only: allocations made inside OpenMP worker threads (the
    fused op allocates its per-thread row-block scratch there) are invisible to it. So by default the
    step is run with ``torch.set_num_threads(1)`` (one warm-up call, then the profiled call), which
    puts every allocation on the profiled thread; with T threads the fused op holds T row-block
    buffers (each at most ``rows x K`` floats, about 1 MiB) instead of one. ``threads=None`` keeps the
    current thread count (and then undercounts worker-thread allocations). ``warmup=False`` skips the
    un-profiled call (for closures that take seconds; they were warmed up when built).
    """
    from torch.profiler import ProfilerActivity, profile

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if warmup:
            _reset_grad(case)
            fn()
        _reset_grad(case)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            out = fn()
            del out
    finally:
        torch.set_num_threads(saved)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and _is_cpu(e)]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def _is_cpu(ev) -> bool:
    try:
        return int(ev.device_type()) == int(torch._C._autograd.DeviceType.CPU)
    except Exception:  # older/newer bindings: keep the event (CPU-only runs have CPU events only)
        return True


def peak_extra_cuda(fn: Callable[[], object], case=None, device=None) -> int:
    """Peak extra bytes on the CUDA caching allocator while ``fn()`` runs."""
    dev = torch.device(device if device is not None else "cuda")
    _reset_grad(case)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    del out
    return int(torch.cuda.max_memory_allocated(dev) - base)


def peak_extra(fn: Callable[[], object], device, case=None, warmup: bool = True) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return peak_extra_cuda(fn, case, dev)
    return peak_extra_cpu(fn, case, warmup=warmup)


def measure(shapes, device, providers, alpha=0.4) -> Dict[str, Dict[str, Optional[int]]]:
    """{shape name: {provider: peak extra bytes or None when skipped}}."""
    from . import providers as P

    out: Dict[str, Dict[str, Optional[int]]] = {}
    for shape in shapes:
        case = P.make_case(shape, device)
        row: Dict[str, Optional[int]] = {}
        for name in providers:
            try:
                fn = P.build(name, case, alpha)
            except P.Skip:
                row[name] = None
                continue
            row[name] = peak_extra(fn, device, case, warmup=name != "paper_loop")
            del fn
        out[shape.name] = row
    return out


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def main(argv=None) -> int:
    from . import providers as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=None, help="cpu, gpu, or a comma list of shape names")
    ap.add_argument("--providers",
                    default="fused,eager,compiled,paper_loop,sdpa,liger,torch_lce,torch_lce_chunked,gemm2")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    shapes = P.shapes_for(args.shapes or ("gpu" if dev.type == "cuda" else "cpu"))
    provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    res = measure(shapes, dev, provs)
    print(f"peak extra memory per forward+backward step ({MEMORY_METHOD[dev.type]})\n")
    print("| shape | " + " | ".join(provs) + " |")
    print("|---|" + "---:|" * len(provs))
    for s in shapes:
        print(f"| {s.label} | " + " | ".join(fmt_bytes(res[s.name][p]) for p in provs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
