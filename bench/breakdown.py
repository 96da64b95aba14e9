"""Where the fused op's time goes at a shape: the GEMMs alone, the raw native op, the Python/autograd layer.

    python -m bench.breakdown --shapes cpu [--threads N]

Rows (each a torch.utils.benchmark ``blocked_autorange`` median, interleaved shape by shape):

- ``fused step``: ``haframe_loss(h, W, y)`` forward + ``backward()`` (the benchmark's ``fused`` provider);
- ``raw op (need_grad)``: ``torch.ops.haframe_ext.fused_loss`` (reduction mean) on detached features with the
  cached S or M, computing the loss and the gradient (all native work of one step, no autograd, no Python
  wrapper);
- ``raw op (loss only)``: the same without the gradient (one GEMM + epilogue);
- ``gemm2``: ``torch.mm(h, W.T)`` then ``torch.mm(Z, W)``, the two unavoidable GEMMs (the lower bound);
- ``gemm1``: the logits GEMM alone;
- ``autograd floor``: a trivial op on a 64-vector forward + backward (the fixed cost of one autograd step);
- ``eager step``: the eager provider, for the ratio;
- with ``--block-rows 26,256``: the two GEMMs done that many rows at a time (torch.mm into reused buffers,
  one block after the other, MKL threads inside each GEMM), to show what row blocking costs at large K.

``fused step - raw op`` is the cost of the Python wrapper, the custom-op autograd and the reduction;
``raw op - gemm2`` is the native op's own overhead (epilogue, norms, checks, threading).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer

from . import providers as P


def raw_op(features, weight, target, similarity, gram, need_grad: bool):
    """Call ``torch.ops.haframe_ext.fused_loss`` by argument name (its schema has changed over time)."""
    import haframe_ext  # noqa: F401  (loads the native library that registers the op)

    op = torch.ops.haframe_ext.fused_loss.default
    vals = {"features": features, "weight": weight, "target": target, "similarity": similarity, "gram": gram,
            "alpha": P.ALPHA, "ignore_index": -100, "reduction": 1, "need_grad": need_grad}
    names = [a.name for a in op._schema.arguments]
    missing = [n for n in names if n not in vals]
    if missing:
        raise RuntimeError(f"haframe_ext::fused_loss has arguments this script does not know: {missing}")
    args = [vals[n] for n in names]
    return lambda: op(*args)


def blocked_gemm2(h, W, rows: int):
    """The two GEMMs done ``rows`` rows at a time into reused buffers (as a row-blocked kernel does them)."""
    B, d = h.shape
    z = torch.empty(rows, W.shape[0], dtype=h.dtype, device=h.device)
    g = torch.empty(B, d, dtype=h.dtype, device=h.device)

    def fn():
        for r0 in range(0, B, rows):
            nr = min(rows, B - r0)
            zb = z[:nr]
            torch.mm(h[r0:r0 + nr], W.T, out=zb)
            torch.mm(zb, W, out=g[r0:r0 + nr])
        return g

    return fn


def breakdown(shape: P.Shape, device="cpu", min_run_time: float = 1.0, block_rows=()):
    case = P.make_case(shape, device)
    h, W, y = case.h, case.W, case.y
    hd = h.detach()
    S = case.S  # what the fused op gets: S = W W^T (K x K), or the d x d gram for the large frames
    M = None if S is not None else (W.float().T @ W.float()).contiguous()
    x = torch.randn(64, requires_grad=True)

    def floor():
        x.grad = None
        (x * 2).sum().backward()

    fns = {
        "fused step": P.build("fused", case),
        "raw op (need_grad)": raw_op(hd, W, y, S, M, True),
        "raw op (loss only)": raw_op(hd, W, y, S, M, False),
        "gemm2": P.build("gemm2", case),
        "gemm1": lambda: torch.mm(hd, W.T),
        "autograd floor": floor,
        "eager step": P.build("eager", case),
    }
    for r in block_rows:
        if r < shape.B:
            fns[f"gemm2 in {r}-row blocks (sequential)"] = blocked_gemm2(hd, W, r)
    out = {}
    for name, fn in fns.items():
        m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=min_run_time)
        out[name] = (m.median, m.iqr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--block-rows", default="",
                    help="comma list: also time the two GEMMs done in row blocks of these sizes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    for shape in P.shapes_for(args.shapes):
        rows = [int(r) for r in args.block_rows.split(",") if r.strip()]
        res = breakdown(shape, args.device, args.min_run_time, rows)
        print(f"\n{shape.label}\n\n| part | median | IQR |\n|---|---:|---:|")
        for name, (med, iqr) in res.items():
            print(f"| {name} | {med * 1e3:.4f} ms | {iqr * 1e3:.4f} ms |")
        f, r, g = res["fused step"][0], res["raw op (need_grad)"][0], res["gemm2"][0]
        print(f"\nfused step - raw op = {(f - r) * 1e3:.4f} ms (Python wrapper + autograd + reduction); "
              f"raw op - gemm2 = {(r - g) * 1e3:.4f} ms (native overhead); gemm2 / fused step = {g / f:.0%}; "
              f"eager / fused = {res['eager step'][0] / f:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
