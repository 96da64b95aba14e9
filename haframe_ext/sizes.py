"""Size thresholds shared by the frame, the loss, the modules and the benchmarks, and the memory available."""

import os
from typing import Optional

__all__ = ["DENSE_MAX_K", "available_memory", "check_memory"]

# Above this many classes nothing K x K is built: a frame keeps no similarity or distance matrix (rows of S
# come from its tree), the loss takes its d x d route for unit rows, the modules keep no S, the type-II
# layer is as wide as the frame instead of K, and frame quality is measured on sampled pairs.  At 4096
# classes a float64 K x K matrix is 128 MiB.
DENSE_MAX_K = 4096


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse (ValueError) an allocation of about ``nbytes`` that the available memory cannot hold, naming ``what``
    needs it, both sizes and ``fix``; before it is attempted, so that it neither fills the memory nor overflows."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} needs about {nbytes / 2 ** 30:,.1f} GiB of memory and {avail / 2 ** 30:,.1f} GiB is "
                         f"available: {fix}")
