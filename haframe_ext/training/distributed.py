"""Process groups and sharding under torchrun: :class:`DistContext`, :class:`GlobalBatchSampler` and the cross-rank
gathers."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import TYPE_CHECKING

import torch

from .checkpoint import rng_state

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["DistContext", "DistributedError", "GlobalBatchSampler", "derive_seed", "gather_rng", "gather_rows",
           "is_comm_error"]


class DistributedError(RuntimeError):
    """A collective operation failed or timed out (usually: another rank died)."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (seed, epoch, rank, stream), the same on every platform."""
    h = hashlib.sha256(("haframe:" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The training batches of one process for one epoch.

    The epoch's permutation of the dataset (seeded by ``seed`` and ``epoch`` only) is cut into
    global batches of ``per_rank * world`` samples, and process ``rank`` takes the ``rank``-th
    near-equal slice of each.  So every world size sees the same global batches in the same
    order (a single process is ``world = 1``), which is what lets a torchrun run match a
    single-process run with the same global batch (up to per-process batch-norm statistics).
    A final global batch with fewer than 2 samples per process is dropped (batch norm).
    Unlike ``DistributedSampler`` it never pads by repeating samples.
    """

    def __init__(self, n: int, per_rank: int, world: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0):
        self.n, self.per_rank, self.world, self.rank = int(n), int(per_rank), int(world), int(rank)
        self.seed, self.epoch = int(seed), int(epoch)

    def _chunks(self):
        B = self.per_rank * self.world
        for start in range(0, self.n, B):
            size = min(B, self.n - start)
            if size < 2 * self.world:
                break
            yield start, size

    def __iter__(self):
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch + 1, 10 ** 6))
        perm = torch.randperm(self.n, generator=g).tolist()
        for start, size in self._chunks():
            q, r = divmod(size, self.world)
            lo = start + self.rank * q + min(self.rank, r)
            yield perm[lo:lo + q + (1 if self.rank < r else 0)]

    def __len__(self) -> int:
        return sum(1 for _ in self._chunks())


class DistContext:
    """Rank/world/device of this process; a no-op when not under torchrun."""

    def __init__(self, config: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.owns_group = False
        want = config.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {want!r} requested but there are {torch.cuda.device_count()} CUDA device(s) "
                             "(--device cuda:N counts from 0)")
        if self.enabled:
            import torch.distributed as dist

            if want.startswith("cuda"):
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
                backend = "nccl"
            else:
                self.device = torch.device("cpu")
                backend = "gloo"
            if not dist.is_initialized():
                try:
                    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(config.dist_timeout)))
                except Exception as exc:
                    raise DistributedError(f"rank {self.rank}: could not join the process group "
                                           f"({type(exc).__name__}: {exc})") from exc
                self.owns_group = True
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()
        else:
            self.device = torch.device(want)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def from_main(self, value):
        """Rank 0's ``value`` (a small picklable object) on every rank; ``value`` itself without torchrun.

        For decisions only rank 0 can make (it alone reads the run folder): every rank then acts, and words its
        error, alike, whichever rank's message the launcher shows first."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self, failed: bool = False) -> None:
        if failed:  # tearing down a broken group can abort in the backend: leave it to process exit
            return
        if self.owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from a collective (a dead or stuck peer) rather than from this process's own work."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())) or isinstance(exc, getattr(dist, "DistBackendError", ())):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "process group"))


def gather_rows(F: torch.Tensor, Y: torch.Tensor, dctx: DistContext):
    """Every rank's rows, in rank order, on every rank. F: (n_rank, d) features, Y: (n_rank,) labels."""
    import torch.distributed as dist

    n = torch.tensor([F.shape[0]], device=dctx.device)
    sizes = [torch.zeros_like(n) for _ in range(dctx.world)]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    Fp = torch.zeros(m, F.shape[1], dtype=F.dtype)
    Yp = torch.full((m,), -1, dtype=torch.long)
    Fp[:F.shape[0]] = F
    Yp[:Y.shape[0]] = Y
    Fg = [torch.zeros_like(Fp, device=dctx.device) for _ in range(dctx.world)]
    Yg = [torch.zeros_like(Yp, device=dctx.device) for _ in range(dctx.world)]
    dist.all_gather(Fg, Fp.to(dctx.device))
    dist.all_gather(Yg, Yp.to(dctx.device))
    Fs = torch.cat([f[:int(s)].cpu() for f, s in zip(Fg, sizes)])
    Ys = torch.cat([y[:int(s)].cpu() for y, s in zip(Yg, sizes)])
    return Fs, Ys


def gather_rng(dctx: DistContext):
    """Every rank's RNG states, in rank order (a list of one state without torchrun)."""
    state = rng_state()
    if not dctx.enabled:
        return [state]
    import torch.distributed as dist

    states = [None] * dctx.world
    dist.all_gather_object(states, state)
    return states
