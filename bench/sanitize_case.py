"""A small CUDA case of every fused-loss kernel path, for compute-sanitizer (memcheck / racecheck)."""

import torch
import torch.nn.functional as F

import haframe_ext as hx


def main() -> None:
    """Run both routes, every dtype, an ignored row and a zero row, forward and backward, on CUDA."""
    assert hx.native_available(), hx.native_error()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for B, K, d in ((5, 3, 7), (9, 37, 20)):
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
    print("sanitize case ok")


if __name__ == "__main__":
    main()
