"""Where one forward+backward step spends its time, host and device: torch.profiler over a few steps.

    python -m bench.profile_step --device cuda --shapes inat,sq4096_bf16 [--providers fused,fused_tuned,eager]

For each shape and provider (bench/providers.py closures, built and warmed up first) it profiles
``--steps`` steps and prints: wall time per step, host (CPU) time per step summed over the top-level
ops, device time per step (sum of kernel times), and the ops with the largest self device and self
host times. A step whose wall time is far above its device time is bound by the host (Python,
dispatcher, launches, the label check's copy back); one near its device time is bound by the kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from . import providers as P


def _device_us(evt) -> float:
    """Self device time of a profiler aggregate in us (the attribute name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_provider(fn, device: torch.device, steps: int, top: int) -> str:
    """Profile ``steps`` calls of ``fn`` and return a text report."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
    wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    dev_total = sum(_device_us(e) for e in events) / steps / 1e3
    n_aten = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    n_kernels = sum(e.count for e in events if _device_us(e) > 0 and "::" not in e.key) / steps
    lines = [f"wall {wall:.3f} ms/step (under the profiler), device kernels {dev_total:.3f} ms/step, "
             f"{n_aten:.0f} aten calls and {n_kernels:.0f} kernels per step"]
    by_dev = sorted(events, key=_device_us, reverse=True)[:top]
    lines.append("  top self device time (us/step):")
    for e in by_dev:
        if _device_us(e) > 0:
            lines.append(f"    {_device_us(e) / steps:9.1f}  x{e.count // steps:<3d} {e.key[:90]}")
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    lines.append("  top self host time (us/step):")
    for e in by_cpu:
        lines.append(f"    {e.self_cpu_time_total / steps:9.1f}  x{e.count // steps:<3d} {e.key[:90]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="inat", help="comma list of names from bench/providers.py")
    ap.add_argument("--providers", default="fused,fused_tuned,eager")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    for shape in P.shapes_for(args.shapes):
        case = P.make_case(shape, dev)
        for name in [p.strip() for p in args.providers.split(",") if p.strip()]:
            try:
                fn = P.build(name, case)
            except P.Skip as exc:
                print(f"[{shape.label}] {name}: skipped ({exc})")
                continue
            except Exception as exc:  # report and go on with the other providers
                print(f"[{shape.label}] {name}: ERROR {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for _ in range(3):
                fn()
            profile_provider(fn, dev, 1, 0)  # the profiler's own start-up, not reported
            print(f"[{shape.label}] {name}: {profile_provider(fn, dev, args.steps, args.top)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
