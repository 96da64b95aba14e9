"""The CUDA kernels of the fused loss, run on the CPU by a small emulator, behind the CUDA host's logic.

``build()`` rewrites ``csrc/cuda/fused_loss_kernels.cu`` so that g++ compiles it against the stand-in
headers of ``include/`` (each ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``emu::launch(kernel, grid, block, smem, stream)(args)``), links it with ``bindings.cpp`` into a shared
library (cached under ``build/cuda_emu/`` by source hash) and loads it with ctypes.

``fused_loss(...)`` replays ``csrc/cuda/fused_loss.cpp`` step by step on CPU tensors (torch.mm for the
cuBLAS GEMMs, the emulated kernels for everything else), default path or tuned path, so that the kernel
code that only a GPU session can time is at least executed and checked against the float64
reference on every machine. Keep it in step with fused_loss.cpp.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNELS = ROOT / "csrc" / "cuda" / "fused_loss_kernels.cu"
SOURCES = [KERNELS, ROOT / "csrc" / "cuda" / "fused_loss_kernels.cuh", ROOT / "csrc" / "haframe_math.h",
           HERE / "bindings.cpp", *sorted((HERE / "include").glob("*.h"))]
LAUNCH = re.compile(r"(\w+_kernel(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
CHUNK_BYTES = 64 << 20  # kCudaChunkBytes of fused_loss.cpp
EPS = 1e-8  # kEps
_TAGS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_LIB = None


def rewrite(source: str) -> str:
    """The .cu source with every <<<...>>> launch turned into an emu::launch call (g++ can compile it)."""
    out, n = LAUNCH.subn(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})(", source)
    if n == 0 or "<<<" in out:
        raise RuntimeError("cuda_emu: could not rewrite the kernel launches of fused_loss_kernels.cu")
    return out


def compiler() -> str | None:
    return shutil.which("g++")


def build() -> Path:
    """Compile (once per source version) and return the path of the emulator library."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out_dir = ROOT / "build" / "cuda_emu"
    lib = out_dir / f"emu_{digest}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"work_{os.getpid()}"  # concurrent builds (several pytest processes) do not collide
    work.mkdir(exist_ok=True)
    src = work / "kernels_emu.cpp"
    src.write_text(f'#line 1 "{KERNELS}"\n' + rewrite(KERNELS.read_text()))
    tmp = work / lib.name
    cmd = [compiler() or "g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-w",
           f"-I{HERE / 'include'}", f"-I{work}", f"-I{KERNELS.parent}", str(HERE / "bindings.cpp"),
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
    """Data pointer of a tensor (None for a missing one)."""
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _i(v):
    return ctypes.c_int64(int(v))


def _f(v):
    return ctypes.c_double(float(v))


def _check():
    msg = lib().emu_pop_error().decode()
    if msg:
        raise AssertionError(f"emulated kernel broke a rule: {msg}")


@torch.no_grad()
def fused_loss(features, weight, target, similarity=None, gram=None, alpha=0.4, ignore_index=-100,
               reduction=1, need_grad=True, tuned=False, chunk_bytes=CHUNK_BYTES, capturing=False):
    """csrc/cuda/fused_loss.cpp's fused_loss_cuda on CPU tensors: (loss, grad); reduction 0 none, 1 mean, 2 sum.
    ``capturing`` replays the CUDA-graph capture branch (counters and gradient scale kept on the device)."""
    L = lib()
    B, d = features.shape
    K = weight.shape[0]
    dtype = features.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tag = _TAGS[dtype]
    y = target.to(torch.int64).contiguous()
    yp = ctypes.cast(y.data_ptr(), ctypes.POINTER(ctypes.c_int64)) if B > 0 else None

    stats = torch.empty(2, dtype=torch.int64)
    sp = ctypes.cast(stats.data_ptr(), ctypes.POINTER(ctypes.c_ulonglong))
    if capturing:
        L.emu_label_check(yp, _i(B), _i(K), _i(ignore_index), sp)
        n_valid, first_bad = 0, 0  # not seen by the host
    elif tuned:
        host = (ctypes.c_ulonglong * 2)()
        assert L.emu_label_check_to_host(yp, _i(B), _i(K), _i(ignore_index), sp, host) == 0
        n_valid, first_bad = int(host[0]), int(host[1])
    else:
        L.emu_label_check(yp, _i(B), _i(K), _i(ignore_index), sp)
        n_valid, first_bad = int(stats[0]), int(stats[1])
    _check()
    if first_bad > 0:
        i = B - first_bad
        raise ValueError(f"target[{i}] = {int(y[i])} is not a class index")

    rows = torch.full((B,), float("nan"), dtype=acc)  # poisoned: the kernels must write every row
    grad = torch.full((B, d), float("nan"), dtype=dtype) if need_grad else torch.empty(0, dtype=dtype)
    if B > 0:
        h = features.contiguous()
        W = weight.contiguous()
        mroute = gram is not None
        inv_wn = None
        if not mroute and not tuned:
            inv_wn = torch.linalg.vector_norm(W.to(acc), dim=1).clamp_min(EPS).reciprocal()
        if not mroute and tuned:
            inv_wn = torch.full((K,), float("nan"), dtype=acc)
        S = None if mroute else similarity.contiguous()
        M = gram.contiguous() if mroute else None
        R = max(1, min(B, chunk_bytes // max(1, K * features.element_size())))
        nan = float("nan")  # every buffer poisoned, as HAFRAME_DEBUG_POISON=1 does on the GPU
        zbuf = torch.full((R, K), nan, dtype=dtype)
        coef = torch.full((R,), nan, dtype=acc)
        inv_n = torch.full((R,), nan, dtype=acc)
        ubuf = torch.full((R, d), nan, dtype=acc) if mroute else None
        vbuf = torch.full((R, d), nan, dtype=acc) if mroute else None
        gscale = (1.0 / n_valid if n_valid > 0 else 0.0) if reduction == 1 else 1.0
        gdev = None
        if capturing:
            gdev = torch.full((1,), float("nan"), dtype=acc)
            getattr(L, f"emu_grad_scale_{'f64' if acc == torch.float64 else 'f32'}")(sp, ctypes.c_int(reduction == 1),
                                                                                   _p(gdev))
        if tuned and not mroute:
            getattr(L, f"emu_row_inv_norm_{tag}")(_p(W), _i(K), _i(d), _p(inv_wn))
            _check()
        ptrs = (ctypes.c_void_p * 7)(zbuf.data_ptr(), h.data_ptr(), W.data_ptr(),
                                     None if mroute else S.data_ptr(), None if inv_wn is None else inv_wn.data_ptr(),
                                     None if ubuf is None else ubuf.data_ptr(),
                                     grad.data_ptr() if need_grad else None)
        vec = tuned and bool(L.emu_vec_supported(_i(K), _i(d), ctypes.c_int(features.element_size()), ptrs, 7))
        for r0 in range(0, B, R):
            nr = min(R, B - r0)
            hb = h[r0:r0 + nr]
            z = zbuf[:nr]
            torch.mm(hb, W.t(), out=z)
            lp = rows[r0:r0 + nr]
            gb = grad[r0:r0 + nr] if need_grad else None
            yb = ctypes.cast(y.data_ptr() + 8 * r0, ctypes.POINTER(ctypes.c_int64))
            common = (_p(z), _p(hb), _p(W), _p(inv_wn), _p(S), yb, _i(nr), _i(K), _i(d), _f(alpha),
                      _i(ignore_index), ctypes.c_int(int(need_grad)), _f(gscale), _p(gdev), _p(lp))
            if vec:
                getattr(L, f"emu_row_epilogue_vec_{tag}")(*common, _p(inv_n), _p(ubuf),
                                                          _p(gb) if need_grad and not mroute else None)
            else:
                getattr(L, f"emu_row_epilogue_{tag}")(*common, _p(coef), _p(inv_n), _p(ubuf))
            _check()
            if mroute:
                v = vbuf[:nr]
                torch.mm(ubuf[:nr], M, out=v)
                getattr(L, f"emu_mroute_finish_{tag}")(_p(hb), _p(ubuf), _p(v), _p(inv_n), _i(nr), _i(d), _f(alpha),
                                                       _f(gscale), _p(gdev), _p(lp), _p(gb) if need_grad else None)
                _check()
            elif need_grad and not vec:
                getattr(L, f"emu_gather_correction_{tag}")(_p(hb), _p(coef), _i(nr), _i(d), _p(gb))
                _check()
            if need_grad:
                gb.addmm_(z, W)
    if reduction == 0:
        return rows, grad
    total = rows.sum()
    if reduction == 1:
        if capturing:
            total = total / stats[0].to(total.dtype)
        else:
            total = total / n_valid if n_valid > 0 else total / 0.0
    return total, grad
