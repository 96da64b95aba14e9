"""``haframe bench``: time the fused HAFrame loss against the reference, forward and backward, in this process."""

from __future__ import annotations

import os
import subprocess
import sys

from .commands import UserError, check_device

__all__ = ["cmd_bench", "FULL_BENCH_MODULE"]

# the repository's provider benchmark: a source checkout's bench/ folder, not part of the installed package
FULL_BENCH_MODULE = "bench.run_quick"


def cmd_bench(args) -> int:
    """``haframe bench``: the quick in-process timing, or with --full the source checkout's provider benchmark."""
    if args.full is None:
        return _bench_in_process(args)
    command = [sys.executable, "-m", FULL_BENCH_MODULE, *args.full]
    if not os.path.isfile(os.path.join("bench", "run_quick.py")):
        raise UserError(f"--full needs a source checkout: run it from the repository root (where bench/run_quick.py "
                        f"is), or run 'python -m {FULL_BENCH_MODULE}' there; without --full the quick timing runs")
    print(f"running {' '.join(command[1:])} (the repository's provider benchmark)", flush=True)
    return subprocess.run(command).returncode


def _bench_in_process(args) -> int:
    """Time both providers in alternating blocks and print the best and worst block medians."""
    import torch
    import torch.utils.benchmark as benchmark

    from ..ops import fused as ops
    from ..ops.native import native_available, native_error
    from ..frame.frame import HAFrame

    check_device(args.device)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    frame = HAFrame.etf(args.classes, dim=args.dim, seed=0) if args.etf else None
    if frame is None:
        from ..hierarchy.hierarchy import Hierarchy

        if args.classes == 100:
            frame = HAFrame.from_hierarchy(Hierarchy.builtin("cifar100"), 2.0, dim=args.dim)
        else:
            frame = HAFrame.etf(args.classes, dim=args.dim, seed=0)
    g = torch.Generator().manual_seed(0)
    W = frame.weight.to(device=device, dtype=dtype)
    S = frame.similarity.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    h = torch.randn(args.batch, frame.dim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, frame.num_classes, (args.batch,), generator=g).to(device)

    def step(fn):
        h.grad = None
        loss = fn(h, W, y, 0.4, similarity=S)
        loss.backward()
        return loss

    threads = args.threads if args.threads else (1 if device.type == "cpu" else torch.get_num_threads())
    providers = (("reference_loss", ops.reference_loss), ("haframe_loss", ops.haframe_loss))
    medians = {name: [] for name, _ in providers}
    for name, fn in providers:
        step(fn)  # warm up
    # alternate the providers in several short blocks so that background load hits them alike;
    # report the best block median of each (the least disturbed estimate)
    for _ in range(max(1, args.repeats)):
        for name, fn in providers:
            t = benchmark.Timer(stmt="step(fn)", globals={"step": step, "fn": fn}, num_threads=threads)
            medians[name].append(t.blocked_autorange(min_run_time=args.min_run_time / max(1, args.repeats)).median)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    print(f"HAFrame loss forward+backward, B={args.batch}, K={frame.num_classes}, d={frame.dim}, {args.dtype}, "
          f"device={device}, threads={threads}, TF32={'on' if tf32 else 'off'}, "
          f"native={'yes' if native_available() else 'no (' + str(native_error()) + ')'}")
    print(f"{'provider':18s}{'best median (us)':>18s}{'worst (us)':>12s}{'speedup':>10s}")
    base = min(medians["reference_loss"])
    for name, _ in providers:
        best, worst = min(medians[name]) * 1e6, max(medians[name]) * 1e6
        print(f"{name:18s}{best:18.1f}{worst:12.1f}{base * 1e6 / best:10.2f}x")
    return 0
