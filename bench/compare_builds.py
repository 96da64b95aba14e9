"""Time the raw fused op of one build's ``_C.so`` (loss and gradient, M route), for comparing builds side by side.

    python bench/compare_builds.py OLD/_C.so NEW/_C.so [--K 100000 --d 512 --B 256 --threads 2]

Each ``.so`` is loaded in its own child process (HAFRAME_DISABLE_NATIVE=1 keeps the installed one out),
on the same seeded inputs; prints the median and minimum of --calls calls, and the loss (equal across
builds when they agree).
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _child(so: str, K: int, d: int, B: int, threads: int, calls: int) -> dict:
    """One build: load its op, time it on seeded unit-row weights with the d x d gram."""
    import torch

    torch.ops.load_library(so)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
    M = (W.T @ W).contiguous()
    h, y = torch.randn(B, d), torch.randint(0, K, (B,))
    op = torch.ops.haframe_ext.fused_loss
    op(h, W, y, None, M, 0.4, -100, 1, True)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        loss, _ = op(h, W, y, None, M, 0.4, -100, 1, True)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"so": so, "median_s": times[len(times) // 2], "min_s": times[0], "loss": float(loss)}


def main(argv=None) -> int:
    """Run every build in a child process and print one JSON line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("so", nargs="+", help="paths of _C.so files to compare")
    p.add_argument("--K", type=int, default=100_000, help="classes")
    p.add_argument("--d", type=int, default=512, help="feature dimension")
    p.add_argument("--B", type=int, default=256, help="batch rows")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--calls", type=int, default=7, help="timed calls per build")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.so[0], args.K, args.d, args.B, args.threads, args.calls)))
        return 0
    env = dict(os.environ, HAFRAME_DISABLE_NATIVE="1")
    for so in args.so:
        cmd = [sys.executable, __file__, so, "--child", "--K", str(args.K), "--d", str(args.d), "--B", str(args.B),
               "--threads", str(args.threads), "--calls", str(args.calls)]
        print(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
