"""The CUDA kernel of the hierarchical losses, run on the CPU by the emulator of tests/cuda_emu, behind the host's
logic.

``build()`` rewrites ``csrc/cuda/hier_loss_kernels.cu`` as ``emulated.py`` does for the fused loss (each
``kernel<<<...>>>(args)`` becomes ``emu::launch(kernel, ...)(args)``), links it with ``hier_bindings.cpp``
and loads it with ctypes. ``hier_loss(...)`` replays ``csrc/cuda/hier_loss.cpp`` on CPU tensors (torch.mm
for the cuBLAS GEMMs, the emulated kernel for the epilogue). Keep it in step with hier_loss.cpp.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from .emulated import LAUNCH, compiler

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNELS = ROOT / "csrc" / "cuda" / "hier_loss_kernels.cu"
SOURCES = [KERNELS, ROOT / "csrc" / "cuda" / "hier_loss_kernels.cuh", ROOT / "csrc" / "hier_math.h",
           ROOT / "csrc" / "haframe_math.h", HERE / "hier_bindings.cpp", *sorted((HERE / "include").glob("*.h"))]
CHUNK_BYTES = 64 << 20  # kHierCudaChunkBytes of hier_loss.cpp
_LIB = None


def build() -> Path:
    """Compile (once per source version) and return the path of the emulator library."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out_dir = ROOT / "build" / "cuda_emu"
    lib = out_dir / f"hier_emu_{digest}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"hier_work_{os.getpid()}"
    work.mkdir(exist_ok=True)
    source, n = LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})(", KERNELS.read_text())
    if n == 0 or "<<<" in source:
        raise RuntimeError("cuda_emu: could not rewrite the kernel launches of hier_loss_kernels.cu")
    (work / "hier_kernels_emu.cpp").write_text(f'#line 1 "{KERNELS}"\n' + source)
    tmp = work / lib.name
    cmd = [compiler() or "g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-w",
           f"-I{HERE / 'include'}", f"-I{work}", f"-I{KERNELS.parent}", str(HERE / "hier_bindings.cpp"),
           "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("cuda_emu build failed:\n" + res.stderr[-4000:])
    tmp.replace(lib)
    shutil.rmtree(work, ignore_errors=True)
    return lib


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = ctypes.CDLL(str(build()))
        _LIB.emu_pop_error.restype = ctypes.c_char_p
    return _LIB


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _i(v):
    return ctypes.c_int64(int(v))


@torch.no_grad()
def hier_loss(features, weight, bias, order, path_start, path_end, path_value, kind, row_scale, reduction,
              need_grad, need_weight_grad, chunk_bytes=CHUNK_BYTES):
    """csrc/cuda/hier_loss.cpp's hier_loss_cuda on CPU tensors (inputs as the op takes them, already checked)."""
    L = lib()
    B, d = features.shape
    K, P = weight.shape[0], path_start.shape[1]
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    tag = "f64" if acc == torch.float64 else "f32"
    h, W = features.to(acc).contiguous(), weight.to(acc).contiguous()
    b = None if bias is None else bias.to(acc).contiguous()
    ps, pe, pv = path_start.contiguous(), path_end.contiguous(), path_value.contiguous()
    rs = None if row_scale is None else row_scale.to(acc).contiguous()
    nan = float("nan")  # poisoned: the kernel must write every row it owns
    rows = torch.full((B,), nan, dtype=acc)
    gh = torch.full((B, d), nan, dtype=acc) if need_grad else torch.empty(0, dtype=acc)
    gW = torch.zeros((K, d), dtype=acc) if need_weight_grad else torch.empty(0, dtype=acc)
    gb = torch.zeros(K, dtype=acc) if need_weight_grad else torch.empty(0, dtype=acc)
    if B > 0:
        cap = max(1, min(B, chunk_bytes // max(1, K * h.element_size())))
        nchunks = -(-B // cap)
        chunk = -(-B // nchunks)
        zbuf = torch.full((chunk, K), nan, dtype=acc)
        work = torch.full((chunk, 4 * P), nan, dtype=acc)
        gscale = 1.0 / B if reduction == 1 else 1.0
        for r0 in range(0, B, chunk):
            nr = min(chunk, B - r0)
            hc = h[r0:r0 + nr]
            z = zbuf[:nr]
            if b is None:
                torch.mm(hc, W.t(), out=z)
            else:
                torch.addmm(b, hc, W.t(), out=z)
            off = lambda t, n: ctypes.c_void_p(t.data_ptr() + n * t.element_size())  # noqa: E731
            getattr(L, f"emu_hier_epilogue_{tag}")(
                _p(z), _p(order), off(ps, r0 * P), off(pe, r0 * P), off(pv, r0 * P), _i(nr), _i(K), _i(P), _i(kind),
                ctypes.c_int(int(need_grad or need_weight_grad)), ctypes.c_double(gscale),
                None if rs is None else off(rs, r0), off(rows, r0), _p(work))
            msg = L.emu_pop_error().decode()
            if msg:
                raise AssertionError(f"emulated kernel broke a rule: {msg}")
            if need_grad:
                torch.mm(z, W, out=gh[r0:r0 + nr])
            if need_weight_grad:
                gW.addmm_(z.t(), hc)
                gb += z.sum(0)
    loss = rows if reduction == 0 else (rows.double().sum() / B if reduction == 1 else rows.double().sum()).to(acc)
    return (loss, gh.to(features.dtype) if need_grad else gh, gW.to(weight.dtype) if need_weight_grad else gW,
            gb.to(weight.dtype) if need_weight_grad else gb)
