"""A small CUDA case of every fused-loss kernel path, for compute-sanitizer (memcheck / racecheck)."""

import os

import torch
import torch.nn.functional as F

import haframe_ext as hx


def main() -> None:
    """Both routes, every dtype, an ignored and a zero row, forward and backward, default and tuned paths."""
    assert hx.native_available(), hx.native_error()
    torch.manual_seed(0)
    # (9, 64, 32): the tuned vector epilogue with the row in registers; (5, 4104, 16): streamed rows
    for tuned, dtype, (B, K, d) in [(t, dt, s) for t in ("0", "1")
                                    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                                    for s in ((5, 3, 7), (9, 37, 20), (9, 64, 32), (5, 4104, 16))
                                    if s[1] < 4096 or dt in (torch.float32, torch.bfloat16)]:  # sanitizer time
        os.environ["HAFRAME_CUDA_TUNED"] = tuned
        h = torch.randn(B, d, device="cuda", dtype=dtype)
        h[0] = 0
        w = F.normalize(torch.randn(K, d, device="cuda", dtype=torch.float64), dim=1)
        y = torch.randint(0, K, (B,), device="cuda")
        y[1] = -100
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        wa = w.to(acc)
        for kw in ({"similarity": wa @ wa.T}, {"gram": wa.T @ wa}):
            x = h.clone().requires_grad_()
            loss = hx.ops.haframe_loss(x, w.to(dtype), y, 0.4, backend="native", **kw)
            loss.backward()
            with torch.no_grad():
                hx.ops.haframe_loss(h, w.to(dtype), y, 0.4, reduction="none", backend="native", **kw)
    torch.cuda.synchronize()
    capture_case()
    print("sanitize case ok")


def capture_case() -> None:
    """The CUDA-graph branch: a captured step replayed with an out-of-range label (must read nothing out of range)."""
    for tuned in ("0", "1"):
        os.environ["HAFRAME_CUDA_TUNED"] = tuned
        h = torch.randn(9, 32, device="cuda").requires_grad_()
        w = F.normalize(torch.randn(64, 32, device="cuda"), dim=1)
        y = torch.randint(0, 64, (9,), device="cuda")
        for kw in ({"similarity": w @ w.T}, {"gram": w.T @ w}):
            hx.ops.haframe_loss(h, w, y, 0.4, backend="native", **kw).backward()  # warm-up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            h.grad = None
            with torch.cuda.graph(graph):
                hx.ops.haframe_loss(h, w, y, 0.4, backend="native", **kw).backward()
            y[3] = 1000
            graph.replay()
            y[3] = -7
            graph.replay()
            torch.cuda.synchronize()
            y[3] = 0


if __name__ == "__main__":
    main()
