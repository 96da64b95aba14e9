"""The CUDA kernels of the fused loss, run on the CPU by a small emulator, behind the CUDA host's logic.

``build()`` rewrites ``csrc/cuda/fused_loss_kernels.cu`` so that g++ compiles it against the stand-in
headers of ``include/`` (each ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``emu::launch(kernel, grid, block, smem, stream)(args)``), links it with ``bindings.cpp`` into a shared
library (cached under ``build/cuda_emu/`` by source hash) and loads it with ctypes.

``fused_loss(...)`` replays the CUDA host step by step on CPU tensors (torch.mm for the cuBLAS GEMMs, the
emulated kernels for everything else), so that the kernel code that only a GPU session can time is at least
executed and checked against the float64 reference on every machine. It chooses the path as
``csrc/cuda/fused_loss.cpp`` does, and each path has its mirror here, under the name of its C++ function:
``fused_loss_default``, ``fused_loss_tuned`` and ``fused_loss_capture`` (csrc/cuda/fused_loss_<path>.cpp),
built from the shared steps of ``fused_loss_host.cpp``. Keep them in step with those files.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
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


@dataclass
class Inputs:
    """fused_cuda::Inputs of csrc/cuda/fused_loss_host.h (plus the chunk budget, a test knob)."""
    h: torch.Tensor  # [B, d]
    W: torch.Tensor  # [K, d]
    y: torch.Tensor  # [B] int64
    S: torch.Tensor | None  # [K, K] (gather route)
    M: torch.Tensor | None  # [d, d] (M route)
    alpha: float
    ignore_index: int
    reduction: int
    need_grad: bool
    acc: torch.dtype
    chunk_bytes: int

    @property
    def B(self):
        return self.h.shape[0]

    @property
    def d(self):
        return self.h.shape[1]

    @property
    def K(self):
        return self.W.shape[0]

    @property
    def tag(self):
        return _TAGS[self.h.dtype]

    def y_at(self, r0):
        """Device pointer to y[r0:] (None when B = 0)."""
        return ctypes.cast(self.y.data_ptr() + 8 * r0, ctypes.POINTER(ctypes.c_int64)) if self.B > 0 else None


@dataclass
class Epilogue:
    """fused_cuda::Epilogue: row norms of W, which epilogue kernel, the gradient scale (host value, device scalar)."""
    inv_wn: torch.Tensor | None = None
    vec: bool = False
    gscale: float = 1.0
    gdev: torch.Tensor | None = None


def _counters(stats):
    return ctypes.cast(stats.data_ptr(), ctypes.POINTER(ctypes.c_ulonglong))


def _raise_if_bad_label(inp, first_bad):
    if first_bad > 0:
        i = inp.B - first_bad
        raise ValueError(f"target[{i}] = {int(inp.y[i])} is not a class index")


def _make_buffers(inp):
    """make_buffers: outputs and work buffers, every one NaN-filled (as HAFRAME_DEBUG_POISON=1 does on the GPU)."""
    nan, acc, dtype = float("nan"), inp.acc, inp.h.dtype
    buf = {"rows": torch.full((inp.B,), nan, dtype=acc),
           "grad": torch.full((inp.B, inp.d), nan, dtype=dtype) if inp.need_grad else torch.empty(0, dtype=dtype)}
    if inp.B > 0:
        R = max(1, min(inp.B, inp.chunk_bytes // max(1, inp.K * inp.h.element_size())))
        buf.update(R=R, z=torch.full((R, inp.K), nan, dtype=dtype), coef=torch.full((R,), nan, dtype=acc),
                   inv_n=torch.full((R,), nan, dtype=acc),
                   u=torch.full((R, inp.d), nan, dtype=acc) if inp.M is not None else None,
                   v=torch.full((R, inp.d), nan, dtype=acc) if inp.M is not None else None)
    return buf


def _finish_on_host(inp, buf, n_valid):
    if inp.reduction == 0:
        return buf["rows"], buf["grad"]
    total = buf["rows"].sum()
    if inp.reduction == 1:
        total = total / n_valid if n_valid > 0 else total / 0.0
    return total, buf["grad"]


def _host_grad_scale(inp, n_valid):
    if inp.reduction != 1:
        return 1.0
    return 1.0 / n_valid if n_valid > 0 else 0.0


def _default_epilogue(inp):
    """default_epilogue: row norms by ATen, the generic kernels."""
    if inp.M is not None:
        return Epilogue()
    return Epilogue(inv_wn=torch.linalg.vector_norm(inp.W.to(inp.acc), dim=1).clamp_min(EPS).reciprocal())


def _tuned_epilogue(inp, buf):
    """tuned_epilogue: row norms by one kernel, the vector epilogue wherever the buffers allow it."""
    L, e = lib(), Epilogue()
    if inp.M is None:
        e.inv_wn = torch.full((inp.K,), float("nan"), dtype=inp.acc)
        getattr(L, f"emu_row_inv_norm_{inp.tag}")(_p(inp.W), _i(inp.K), _i(inp.d), _p(e.inv_wn))
        _check()
    ptrs = (ctypes.c_void_p * 7)(buf["z"].data_ptr(), inp.h.data_ptr(), inp.W.data_ptr(),
                                 None if inp.S is None else inp.S.data_ptr(),
                                 None if e.inv_wn is None else e.inv_wn.data_ptr(),
                                 None if buf["u"] is None else buf["u"].data_ptr(),
                                 buf["grad"].data_ptr() if inp.need_grad else None)
    e.vec = bool(L.emu_vec_supported(_i(inp.K), _i(inp.d), ctypes.c_int(inp.h.element_size()), ptrs, 7))
    return e


def _chunk_epilogue(inp, buf, e, r0, nr, z, hb, gb):
    """chunk_epilogue: loss rows, G over the logits in z, the correction in gb."""
    L, tag, mroute = lib(), inp.tag, inp.M is not None
    lp = buf["rows"][r0:r0 + nr]
    common = (_p(z), _p(hb), _p(inp.W), _p(e.inv_wn), _p(inp.S), inp.y_at(r0), _i(nr), _i(inp.K), _i(inp.d),
              _f(inp.alpha), _i(inp.ignore_index), ctypes.c_int(int(inp.need_grad)), _f(e.gscale), _p(e.gdev), _p(lp))
    if e.vec:
        getattr(L, f"emu_row_epilogue_vec_{tag}")(*common, _p(buf["inv_n"]), _p(buf["u"]),
                                                  _p(gb) if inp.need_grad and not mroute else None)
    else:
        getattr(L, f"emu_row_epilogue_{tag}")(*common, _p(buf["coef"]), _p(buf["inv_n"]), _p(buf["u"]))
    _check()
    if mroute:
        v = buf["v"][:nr]
        torch.mm(buf["u"][:nr], inp.M, out=v)
        getattr(L, f"emu_mroute_finish_{tag}")(_p(hb), _p(buf["u"]), _p(v), _p(buf["inv_n"]), _i(nr), _i(inp.d),
                                               _f(inp.alpha), _f(e.gscale), _p(e.gdev), _p(lp),
                                               _p(gb) if inp.need_grad else None)
        _check()
    elif inp.need_grad and not e.vec:
        getattr(L, f"emu_gather_correction_{tag}")(_p(hb), _p(buf["coef"]), _i(nr), _i(inp.d), _p(gb))
        _check()


def _run_chunks(inp, buf, e):
    """run_chunks: the logits GEMM (torch.mm for cuBLAS), the epilogue and the backward GEMM per chunk."""
    R = buf["R"]
    for r0 in range(0, inp.B, R):
        nr = min(R, inp.B - r0)
        hb = inp.h[r0:r0 + nr]
        z = buf["z"][:nr]
        torch.mm(hb, inp.W.t(), out=z)
        gb = buf["grad"][r0:r0 + nr] if inp.need_grad else None
        _chunk_epilogue(inp, buf, e, r0, nr, z, hb, gb)
        if inp.need_grad:
            gb.addmm_(z, inp.W)


def fused_loss_default(inp):
    """fused_loss_default.cpp: the counters copied back, a bad label raised, ATen row norms, the generic epilogue."""
    stats = torch.empty(2, dtype=torch.int64)
    lib().emu_label_check(inp.y_at(0), _i(inp.B), _i(inp.K), _i(inp.ignore_index), _counters(stats))
    _check()
    n_valid, first_bad = int(stats[0]), int(stats[1])
    _raise_if_bad_label(inp, first_bad)
    buf = _make_buffers(inp)
    if inp.B > 0:
        e = _default_epilogue(inp)
        e.gscale = _host_grad_scale(inp, n_valid)
        _run_chunks(inp, buf, e)
    return _finish_on_host(inp, buf, n_valid)


def fused_loss_tuned(inp):
    """fused_loss_tuned.cpp: the counters copied to host memory, a bad label raised, the tuned kernels."""
    stats = torch.empty(2, dtype=torch.int64)
    host = (ctypes.c_ulonglong * 2)()
    assert lib().emu_label_check_to_host(inp.y_at(0), _i(inp.B), _i(inp.K), _i(inp.ignore_index),
                                         _counters(stats), host) == 0
    _check()
    n_valid, first_bad = int(host[0]), int(host[1])
    _raise_if_bad_label(inp, first_bad)
    buf = _make_buffers(inp)
    if inp.B > 0:
        e = _tuned_epilogue(inp, buf)
        e.gscale = _host_grad_scale(inp, n_valid)
        _run_chunks(inp, buf, e)
    return _finish_on_host(inp, buf, n_valid)


def fused_loss_capture(inp, tuned_kernels):
    """fused_loss_capture.cpp: counters and gradient scale on the device, nothing read on the host."""
    L = lib()
    stats = torch.empty(2, dtype=torch.int64)
    L.emu_label_check(inp.y_at(0), _i(inp.B), _i(inp.K), _i(inp.ignore_index), _counters(stats))
    _check()
    buf = _make_buffers(inp)
    if inp.B > 0:
        e = _tuned_epilogue(inp, buf) if tuned_kernels else _default_epilogue(inp)
        e.gdev = torch.full((1,), float("nan"), dtype=inp.acc)
        getattr(L, f"emu_grad_scale_{'f64' if inp.acc == torch.float64 else 'f32'}")(
            _counters(stats), ctypes.c_int(inp.reduction == 1), _p(e.gdev))
        e.gscale = 0.0 if inp.reduction == 1 else 1.0  # the device scalar takes its place
        _run_chunks(inp, buf, e)
    if inp.reduction == 0:
        return buf["rows"], buf["grad"]
    total = buf["rows"].sum()
    if inp.reduction == 1:
        total = total / stats[0].to(total.dtype)
    return total, buf["grad"]


@torch.no_grad()
def fused_loss(features, weight, target, similarity=None, gram=None, alpha=0.4, ignore_index=-100,
               reduction=1, need_grad=True, tuned=False, chunk_bytes=CHUNK_BYTES, capturing=False):
    """csrc/cuda/fused_loss.cpp's fused_loss_cuda on CPU tensors: (loss, grad); reduction 0 none, 1 mean, 2 sum.
    The path is chosen as there: ``capturing`` (CUDA-graph capture, with the kernels ``tuned`` picks), else
    ``tuned`` (HAFRAME_CUDA_TUNED=1), else the default."""
    inp = Inputs(features.contiguous(), weight.contiguous(), target.to(torch.int64).contiguous(),
                 None if similarity is None else similarity.contiguous(), None if gram is None else gram.contiguous(),
                 alpha, ignore_index, reduction, need_grad,
                 torch.float64 if features.dtype == torch.float64 else torch.float32, chunk_bytes)
    if capturing:
        return fused_loss_capture(inp, tuned)
    return fused_loss_tuned(inp) if tuned else fused_loss_default(inp)
