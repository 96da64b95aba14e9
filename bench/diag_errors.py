"""Runs each input-error case of the fused op in turn (flushing before each), to locate a crash."""

import sys

import torch
import torch.nn.functional as F

import haframe_ext as hx


def main() -> None:
    """Label errors through every layer: raw op below autograd, raw op, haframe_loss."""
    h = torch.randn(4, 6)
    w = F.normalize(torch.randn(5, 6), dim=1)
    S = w @ w.T
    cases = {
        "below_autograd": lambda y: torch.ops.haframe_ext.fused_loss.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), h, w, y, S, None, 0.4, -100, 0, True),
        "raw_op": lambda y: torch.ops.haframe_ext.fused_loss(h, w, y, S, None, 0.4, -100, 0, True),
        "raw_op_reduced": lambda y: torch.ops.haframe_ext.fused_loss(h, w, y, S, None, 0.4, -100, 1, False),
        "haframe_loss": lambda y: hx.ops.haframe_loss(h, w, y, backend="native"),
    }
    if torch.cuda.is_available():
        hc, wc = h.cuda(), w.cuda()
        cases["cuda_raw_op"] = lambda y: torch.ops.haframe_ext.fused_loss(hc, wc, y.cuda(), S.cuda(), None, 0.4,
                                                                          -100, 0, True)
        cases["cuda_haframe_loss"] = lambda y: hx.ops.haframe_loss(hc, wc, y.cuda(), backend="native")
    only = sys.argv[1:] or list(cases)
    for name in only:
        for label in (5, -1):
            print(f"case {name} label {label} ...", flush=True)
            try:
                cases[name](torch.full((4,), label))
                print("  no error?!", flush=True)
            except Exception as exc:  # noqa: BLE001 - we print what came back
                print(f"  {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    print("diag done", flush=True)


if __name__ == "__main__":
    main()
