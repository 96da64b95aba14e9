"""The package's files: the claim on a run folder (a lock file), atomic writes, rotation, stale temp cleanup and
the content digest that checkpoints and saved frames carry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
from pathlib import Path
from typing import List, Optional, Tuple

try:
    import fcntl
except ImportError:  # not POSIX: the claim falls back to O_EXCL and a process-id check
    fcntl = None

import torch

__all__ = ["FolderInUseError", "LOCK_NAME", "atomic_save", "atomic_write", "atomic_write_text", "claim_folder",
           "content_digest", "release_folder", "rotate_save"]


class FolderInUseError(ValueError):
    """Another live process holds the run folder's lock file (two runs must never write one folder)."""


# ----------------------------------------------------------------------------- claiming a run folder
LOCK_NAME = ".haframe.lock"
_CLAIMS: set = set()  # lock-file descriptors this process holds


def _close_claims_in_child() -> None:
    """In a forked child (a DataLoader worker, say): drop the inherited lock descriptors, so that the claim
    ends with the process that made it and not with its last straggling worker."""
    for fd in list(_CLAIMS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _CLAIMS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_claims_in_child)


def _holder(path: Path) -> str:
    """Who holds a lock file, from what it says ("process 123 on host, since ...")."""
    try:
        pid, host, since = path.read_text().split("\t", 2)
        return f"process {int(pid)} on {host}, since {since.strip()}"
    except (OSError, ValueError):
        return "a process that has not written its name yet"


def claim_folder(out: Path) -> Tuple[int, Path]:
    """Create ``out`` and hold its lock file ``.haframe.lock`` for this process; raise :class:`FolderInUseError`
    when another live process holds it.

    POSIX: an exclusive ``flock`` on the file, which the kernel drops when its process dies, so a killed run
    leaves no stale claim (the file it leaves is simply locked again).  Elsewhere: ``O_EXCL`` creation, and a
    file whose process id no longer runs is stale and taken over.  Pass the result to :func:`release_folder`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    for _ in range(100):
        if fcntl is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: EWOULDBLOCK
                os.close(fd)
                break
            try:  # the holder may have released (unlinked) the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(path.read_text().split("\t", 1)[0])
                except (OSError, ValueError):
                    break  # being written by its new holder
                if _pid_alive(pid):
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process no longer runs
                continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\t{socket.gethostname()}\t{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        _CLAIMS.add(fd)
        return fd, path
    raise FolderInUseError(f"output folder {out} is in use by another training run ({_holder(path)}): wait for it "
                           f"to finish or choose another --out (its lock file is {path})")


def release_folder(claim: Optional[Tuple[int, Path]]) -> None:
    """Give up a claim of :func:`claim_folder` (the lock file goes; a no-op for None)."""
    if claim is None:
        return
    fd, path = claim
    with contextlib.suppress(OSError):  # gone already, or the folder became read-only: the kernel lock still ends
        os.unlink(path)  # while still locked, so a process waiting on this file sees it replaced and retries
    _CLAIMS.discard(fd)
    os.close(fd)


# ----------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_file(path: Path, mode: str, write) -> Path:
    """Write a temp file beside ``path`` with ``write(file)``, flushed and fsynced; return its path.

    A full disk or an interrupt leaves no partial temp file behind.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}  # the same bytes on every locale
        with open(tmp, mode, **text) as f:
            try:
                write(f)
            except RuntimeError as exc:  # torch's zip writer turns a failed write into "unexpected pos"
                os_error = _os_error_in(exc)
                if os_error is None:
                    raise
                raise OSError(os_error.errno, os_error.strerror or str(os_error), str(path)) from None
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _os_error_in(exc: BaseException):
    """The OSError (a full disk, say) that an exception was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_tmp(obj, path: Path) -> Path:
    """``torch.save(obj)`` into a temp file beside ``path`` (see _temp_file)."""
    return _temp_file(path, "wb", lambda f: torch.save(obj, f))


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    _replace(_write_tmp(obj, path), path)
    _fsync_dir(path.parent)


def _replace(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)``; when that fails (``path`` is a folder, say) the temp file goes."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path, write, mode: str = "wb") -> None:
    """Write ``path`` atomically with ``write(file)``: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    _replace(_temp_file(path, mode, write), path)


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    atomic_write(path, lambda f: f.write(text), "w")


# temp files of _write_tmp / atomic_write_text for the files train() writes: ".<name>.tmp-<pid>"
_TEMP_NAME = re.compile(r"^\.(last\.pt|best\.pt|results\.json|config\.json)\.tmp-(\d+)$", re.ASCII)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: leave its file alone
    return True


def _remove_stale_temps(out: Path) -> List[Path]:
    """Remove temp files that a killed write left in ``out`` (only our own ``.<name>.tmp-<pid>`` pattern,
    only of processes that no longer run, never this process's)."""
    removed = []
    try:
        entries = list(os.scandir(out))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_NAME.match(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def rotate_save(obj, out: Path) -> None:
    """Write ``last.pt`` atomically, keeping the previous one as ``prev.pt`` (and removing temp files a
    killed earlier write left behind)."""
    _remove_stale_temps(out)
    last, prev = out / "last.pt", out / "prev.pt"
    tmp = _write_tmp(obj, last)
    if last.exists():
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(out)


def content_digest(obj) -> str:
    """The content hash of a payload of tensors and plain values (tensors' bytes, dtypes and shapes; plain values'
    repr): what a sealed checkpoint or a saved frame stores."""
    h = hashlib.blake2b(digest_size=16)

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=lambda k: (type(k).__name__, str(k))):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[" if isinstance(o, list) else b"(")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()

