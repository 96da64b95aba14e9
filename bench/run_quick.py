"""Quick side-by-side benchmark of the HAFrame loss providers (forward+backward), with memory.

    python -m bench.run_quick --device cpu --shapes cpu
    python -m bench.run_quick --device cuda --shapes gpu --ceilings --out $OUT/gpu_bench.md

For each shape, every applicable provider (bench/providers.py) is built first (compilation and
warm-up happen there, untimed); then the providers are timed ROUND-ROBIN in short blocks (see
``time_round_robin``) so that a background load on a shared machine hits them alike. Each call is a wall-clock
``time.perf_counter`` interval around one forward+backward step; on CUDA the step ends with
``torch.cuda.synchronize`` (and the device is idle when it starts), so the interval covers the
device work. Reported: the median over rounds, the interquartile range, the ratio to the fused op's
median (``x fused`` = provider median / fused median: > 1 means the fused op is faster), the
throughput of the two unavoidable GEMMs at that time (4 B K d FLOPs / median), and the peak extra
memory of one step (bench/memory.py states the method). Every row says whether TF32 was on.

``--ceilings`` first measures a large device-to-device copy (GB/s, read + write bytes) and a large
square GEMM (TFLOP/s) in bf16 and in fp32 with TF32 off and on (on CPU: fp32 only).

``--co-runner CPU`` starts a busy-loop process pinned to logical CPU ``CPU`` (``os.sched_setaffinity``)
before the first shape is built and ends it after the last: the load of a data-loader worker or another
job sharing the machine, the same for every provider. The report names it.

``--out PATH`` writes the markdown report to PATH (and a CSV next to it, ``PATH`` with ``.csv``);
a PATH ending in ``.csv`` writes the CSV only.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from . import memory as MEM
from . import providers as P

DEFAULT_PROVIDERS = ("fused,fused_ce,fused_tuned,fused_graph,eager,eager_graph,compiled,paper_loop,sdpa,liger,"
                     "torch_lce,torch_lce_chunked,gemm2")


# ----------------------------------------------------------------------------- TF32 state
def tf32_enabled() -> bool:
    """Whether cuBLAS fp32 matmuls may use TF32 (new fp32_precision API first, then the legacy flag)."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", "none")
    if prec == "tf32":
        return True
    if prec == "ieee":
        return False
    try:
        return bool(m.allow_tf32)
    except Exception:
        return torch.get_float32_matmul_precision() != "highest"


def set_tf32(on: bool) -> None:
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = "tf32" if on else "ieee"
    else:
        m.allow_tf32 = bool(on)


def tf32_label(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    on = tf32_enabled()
    if dtype != torch.float32:
        return f"{'on' if on else 'off'} (n/a for {str(dtype).replace('torch.', '')})"
    return "on" if on else "off"


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)  # the providers sync already; harmless
    return time.perf_counter() - t0


def time_round_robin(fns: Dict[str, object], device, budget_s: float, min_rounds: int, max_rounds: int,
                     block_s: float = 0.02) -> Dict[str, List[float]]:
    """Time each closure ``n_p`` times, interleaved in blocks; ``n_p`` from a time budget per provider.

    Providers take turns; a turn is a block of back-to-back calls lasting about ``block_s`` (at least
    one call), whose first call is discarded when the block has more than one (it pays for the caches
    the previous provider evicted). Load that drifts during the run thus hits all providers alike, and
    fast providers are still timed warm, as back-to-back steps of a training loop are.
    """
    est = {}
    for name, fn in fns.items():  # slow closures (> 0.5 s) are estimated from one call
        t = _time_once(fn, device)
        est[name] = t if t > 0.5 else min([t] + [_time_once(fn, device) for _ in range(4)])
    want = {n: int(max(min_rounds, min(max_rounds, budget_s / max(t, 1e-7)))) for n, t in est.items()}
    block = {n: max(1, min(want[n], int(block_s / max(t, 1e-7)))) for n, t in est.items()}
    times: Dict[str, List[float]] = {n: [] for n in fns}
    while any(len(times[n]) < want[n] for n in fns):
        for name, fn in fns.items():
            if len(times[name]) >= want[name]:
                continue
            k = block[name]
            ts = [_time_once(fn, device) for _ in range(k + 1 if k > 1 else 1)]
            times[name].extend(ts[1:] if k > 1 else ts)
    return times


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(device: torch.device, copy_bytes: Optional[int] = None, n: Optional[int] = None,
                     iters: int = 10) -> List[Dict[str, object]]:
    """Copy bandwidth and square-GEMM throughput; restores the TF32 setting it found."""
    rows = []
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (256 << 20))
    n = n or (8192 if cuda else 2048)

    def med_time(fn):
        fn()
        _sync(device)
        ts = []
        for _ in range(iters):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                ts.append(_time_once(fn, device))
        return statistics.median(ts)

    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = med_time(functools.partial(dst.copy_, src))  # bound now: the names are deleted below
    rows.append({"what": f"copy {copy_bytes >> 20} MiB device-to-device", "tf32": "n/a",
                 "value": 2 * copy_bytes / t / 1e9, "unit": "GB/s (read+write)", "ms": t * 1e3})
    del src, dst

    saved = tf32_enabled() if cuda else None
    configs = [(torch.bfloat16, None), (torch.float32, False), (torch.float32, True)] if cuda \
        else [(torch.float32, None)]
    try:
        for dtype, tf32 in configs:
            if cuda and tf32 is not None:
                set_tf32(tf32)
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            t = med_time(functools.partial(torch.mm, a, b))
            dt = str(dtype).replace("torch.", "")
            rows.append({"what": f"GEMM {n}x{n}x{n} {dt}",
                         "tf32": ("on" if tf32 else "off") if tf32 is not None else "n/a",
                         "value": 2.0 * n ** 3 / t / 1e12, "unit": "TFLOP/s", "ms": t * 1e3})
            del a, b
    finally:
        if cuda:
            set_tf32(bool(saved))
    return rows


# ----------------------------------------------------------------------------- co-runner
# spins until its parent is gone (a benchmark killed outright leaves no busy loop behind)
_BUSY_LOOP = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nparent = os.getppid()\n"
              "while os.getppid() == parent:\n    for _ in range(1000000):\n        pass\n")


def start_co_runner(cpu: int) -> subprocess.Popen:
    """A Python busy loop pinned to logical CPU ``cpu``; the caller ends it (``stop_co_runner``)."""
    if not 0 <= cpu < (os.cpu_count() or 1):
        raise ValueError(f"--co-runner {cpu}: this machine has logical CPUs 0..{(os.cpu_count() or 1) - 1}")
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(cpu)])
    time.sleep(0.2)  # let it pin itself and start spinning before anything is timed
    if proc.poll() is not None:
        raise RuntimeError(f"the co-runner exited at once (status {proc.returncode})")
    return proc


def stop_co_runner(proc: Optional[subprocess.Popen]) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- the run
def run(shapes, device, providers, alpha=0.4, budget_s=2.0, min_rounds=5, max_rounds=200,
        with_memory=True, log=print) -> List[Dict[str, object]]:
    results = []
    for shape in shapes:
        case = P.make_case(shape, device)
        fns, skipped = {}, {}
        for name in providers:
            t0 = time.perf_counter()
            try:
                fns[name] = P.build(name, case, alpha)
            except P.Skip as exc:
                skipped[name] = str(exc)
                continue
            except Exception as exc:  # a provider that breaks must not sink the whole run
                skipped[name] = f"ERROR {type(exc).__name__}: {str(exc)[:160]}"
                log(f"[{shape.name}] {name}: {skipped[name]}")
                continue
            log(f"[{shape.name}] built {name} in {time.perf_counter() - t0:.1f} s")
        times = time_round_robin(fns, case.device, budget_s, min_rounds, max_rounds)
        mem = {}
        if with_memory:
            for name, fn in fns.items():
                try:
                    mem[name] = MEM.peak_extra(fn, case.device, case, warmup=name != "paper_loop")
                except Exception as exc:
                    log(f"[{shape.name}] memory of {name} failed: {exc}")
                    mem[name] = None
        fused_med = statistics.median(times["fused"]) if times.get("fused") else None
        for name in providers:
            if name in skipped:
                results.append({"shape": shape.label, "shape_name": shape.name, "provider": name,
                                "skipped": skipped[name]})
                continue
            ts = times[name]
            med = statistics.median(ts)
            results.append({
                "shape": shape.label, "shape_name": shape.name, "provider": name,
                "covers": "CE+cos" if name in P.FULL_LOSS else ("CE only" if name in P.CE_ONLY else "2 GEMMs"),
                "median_ms": med * 1e3, "p25_ms": _quantile(ts, 0.25) * 1e3, "p75_ms": _quantile(ts, 0.75) * 1e3,
                "rounds": len(ts), "x_fused": (med / fused_med) if fused_med else None,
                "gemm_tflops": P.gemm2_flops(shape) / med / 1e12,
                "peak_extra_bytes": mem.get(name), "tf32": tf32_label(case.device, shape.dtype),
                "note": P.provider_note(name, shape),
            })
        del fns, case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def environment(device: torch.device) -> Dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "threads": str(torch.get_num_threads()), "device": str(device)}
    try:
        import haframe_ext
        env["haframe_ext native"] = str(haframe_ext.native_available())
    except Exception as exc:  # pragma: no cover
        env["haframe_ext native"] = f"import failed: {exc}"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        env["tf32 (fp32 matmul)"] = "on" if tf32_enabled() else "off"
    else:
        model = platform.processor() or ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        env["cpu"] = f"{model} ({os.cpu_count()} logical CPUs)"
    try:
        env["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return env


TIMING_ROUND_ROBIN = ("median of wall-clock forward+backward steps, providers interleaved round-robin in "
                      "short blocks (CUDA: synchronised)")
TIMING_PYTEST = ("pytest-benchmark pedantic, iterations=1: median of the rounds of each provider, providers "
                 "one after the other (CUDA: synchronised inside the timed function)")


def to_markdown(results, env, ceilings=None, command=None, timing=TIMING_ROUND_ROBIN) -> str:
    out = io.StringIO()
    w = out.write
    w("# HAFrame loss: forward+backward, providers side by side\n\n")
    if command:
        w(f"Command: `{command}`\n\n")
    for k, v in env.items():
        w(f"- {k}: {v}\n")
    w(f"- timing: {timing}\n")
    dev = env.get("device", "cpu")
    w(f"- memory: {MEM.MEMORY_METHOD['cuda' if dev.startswith('cuda') else 'cpu']}\n")
    w("- x fused: provider median / fused median (> 1: fused is faster); "
      "GEMM TFLOP/s: 4 B K d / median\n\n")
    if ceilings:
        w("## Ceilings\n\n| measurement | TF32 | value | time (ms) |\n|---|---|---:|---:|\n")
        for c in ceilings:
            w(f"| {c['what']} | {c['tf32']} | {c['value']:.1f} {c['unit']} | {c['ms']:.3f} |\n")
        w("\n")
    w("## Forward+backward\n\n")
    w("| shape | provider | covers | median (ms) | IQR (ms) | rounds | x fused | GEMM TFLOP/s | peak extra mem "
      "| TF32 | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|---|\n")
    for r in results:
        if "skipped" in r:
            w(f"| {r['shape']} | {r['provider']} | | skipped | | | | | | | {r['skipped']} |\n")
            continue
        xf = f"{r['x_fused']:.2f}" if r["x_fused"] is not None else "-"
        w(f"| {r['shape']} | {r['provider']} | {r['covers']} | {r['median_ms']:.3f} | "
          f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['rounds']} | {xf} | {r['gemm_tflops']:.3f} | "
          f"{MEM.fmt_bytes(r['peak_extra_bytes'])} | {r['tf32']} | {r['note']} |\n")
    return out.getvalue()


CSV_FIELDS = ["shape", "provider", "covers", "median_ms", "p25_ms", "p75_ms", "rounds", "x_fused",
              "gemm_tflops", "peak_extra_bytes", "tf32", "note", "skipped"]


def to_csv(results) -> str:
    out = io.StringIO()
    wr = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    wr.writeheader()
    for r in results:
        wr.writerow(r)
    return out.getvalue()


def results_from_pytest_json(path: str) -> List[Dict[str, object]]:
    """Rows in ``run()``'s format from a pytest-benchmark JSON written by bench/test_bench_loss.py."""
    import json

    with open(path) as f:
        data = json.load(f)
    rows, fused = [], {}
    for b in data["benchmarks"]:
        ei = b.get("extra_info", {})
        st = b["stats"]
        row = {"shape": b.get("group") or ei.get("shape"), "provider": ei.get("provider", b["name"]),
               "covers": ei.get("covers", ""), "median_ms": st["median"] * 1e3, "p25_ms": st["q1"] * 1e3,
               "p75_ms": st["q3"] * 1e3, "rounds": st["rounds"], "x_fused": None,
               "gemm_tflops": 4.0 * ei.get("B", 0) * ei.get("K", 0) * ei.get("d", 0) / st["median"] / 1e12,
               "peak_extra_bytes": ei.get("peak_extra_bytes"), "tf32": ei.get("tf32", ""), "note": ei.get("note", "")}
        rows.append(row)
        if row["provider"] == "fused":
            fused[row["shape"]] = row["median_ms"]
    order = {p: i for i, p in enumerate(DEFAULT_PROVIDERS.split(","))}
    shape_order = list(dict.fromkeys(r["shape"] for r in rows))
    rows.sort(key=lambda r: (shape_order.index(r["shape"]), order.get(r["provider"], 99)))
    for r in rows:
        if r["shape"] in fused:
            r["x_fused"] = r["median_ms"] / fused[r["shape"]]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_quick", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--shapes", default=None,
                    help="cpu, gpu, or a comma list of shape names (default: cpu for CPU, gpu for CUDA)")
    ap.add_argument("--providers", default=DEFAULT_PROVIDERS, help=f"comma list (default {DEFAULT_PROVIDERS})")
    ap.add_argument("--alpha", type=float, default=P.ALPHA)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per provider per shape")
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--max-rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--tf32", choices=["keep", "on", "off"], default="keep",
                    help="fp32 matmul TF32 for the loss timings (default: keep torch's setting, off by default)")
    ap.add_argument("--co-runner", type=int, default=None, metavar="CPU",
                    help="run a busy-loop process pinned to this logical CPU for the whole run")
    ap.add_argument("--ceilings", action="store_true", help="measure copy bandwidth and GEMM throughput first")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=None, help="write markdown (and .csv alongside) to this path")
    ap.add_argument("--from-json", default=None,
                    help="only print the table of a pytest-benchmark JSON from bench/test_bench_loss.py")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        rows = results_from_pytest_json(args.from_json)
        md = to_markdown(rows, {"source": args.from_json}, timing=TIMING_PYTEST)
        print(md)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md)
        return 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 != "keep":
        set_tf32(args.tf32 == "on")
    P.shapes_for(args.shapes or ("gpu" if device.type == "cuda" else "cpu"))  # an unknown name fails here
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in P.PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; known: {list(P.PROVIDERS)}")
    if "fused" not in providers:
        providers.insert(0, "fused")

    co_runner = start_co_runner(args.co_runner) if args.co_runner is not None else None
    try:
        return _main_run(args, device, providers, co_runner)
    finally:
        stop_co_runner(co_runner)


def _main_run(args, device, providers, co_runner) -> int:
    shapes = P.shapes_for(args.shapes or ("gpu" if device.type == "cuda" else "cpu"))
    env = environment(device)
    if co_runner is not None:
        env["co-runner"] = f"a busy-loop process pinned to CPU {args.co_runner} for the whole run (pid {co_runner.pid})"
    for k, v in env.items():
        print(f"{k}: {v}")
    ceilings = None
    if args.ceilings:
        ceilings = measure_ceilings(device)
        for c in ceilings:
            print(f"ceiling: {c['what']} TF32={c['tf32']}: {c['value']:.1f} {c['unit']} ({c['ms']:.3f} ms)")
    command = "python -m bench.run_quick " + " ".join(args.argv)

    def write(results) -> None:
        if not args.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if not args.out.endswith(".csv"):
            with open(args.out, "w") as f:
                f.write(to_markdown(results, env, ceilings, command))
        with open(args.out if args.out.endswith(".csv") else os.path.splitext(args.out)[0] + ".csv", "w") as f:
            f.write(to_csv(results))

    # the report is rewritten after every shape: a run cut short (a device time limit) keeps what it measured
    results = []
    for shape in shapes:
        results += run([shape], device, providers, args.alpha, args.budget, args.min_rounds, args.max_rounds,
                       with_memory=not args.no_memory)
        write(results)
    env["load average (end)"] = environment(device).get("load average", "")
    write(results)
    print()
    print(to_markdown(results, env, ceilings, command))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
