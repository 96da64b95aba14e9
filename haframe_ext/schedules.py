"""The HAFrame loss's mixing weight over epochs: the alpha schedules of the paper code."""

from __future__ import annotations

import math
import numbers
from typing import Optional

from .ops.fused_args import as_alpha

__all__ = ["SCHEDULES", "alpha_at"]

SCHEDULES = (
    "constant",
    "linear-increase",
    "linear-decrease",
    "cosine",
    "cosine-linear",
    "cosine-linear-increase",
    "cosine-linear-decrease",
)


def _finite_positive(x: object) -> bool:
    """True for a finite real number > 0 (not a string, bool, NaN or inf)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def alpha_at(schedule: str, base: float, epoch: float, total_epochs: Optional[int] = None,
             period: Optional[float] = None) -> float:
    """Mixing weight of the cosine term at ``epoch`` (0-based) for a schedule.

    With ``a0 = base``, ``e = epoch``, ``E = total_epochs`` and ``p = period``:

    - ``constant``:                ``a = a0``
    - ``linear-increase``:         ``a = a0 * e / E``
    - ``linear-decrease``:         ``a = a0 * (1 - e / E)``
    - ``cosine``:                  ``a = a0 * (1 - cos(2 pi e / p)) / 2``   (0 at e = 0, a0 at e = p/2)
    - ``cosine-linear`` (= ``cosine-linear-increase``):
                                   ``a = a0 * (1 - cos(2 pi e / p)) / 2 * e / E``
                                   (the cosine oscillation of period p under a linear ramp 0 -> a0)
    - ``cosine-linear-decrease``:  ``a = a0 * (1 - (1 - cos(2 pi e / p)) / 2 * e / E)``

    With ``a0 = 1`` these are exactly the paper code's ``mixing_ratio_scheduler``.

    Args:
        schedule: one of SCHEDULES.
        base: a0, a real number (not range-checked here).
        epoch: e, from 0 (fractions allowed).
        total_epochs: E > 0, for every schedule but "constant" and "cosine".
        period: p > 0, for the cosine schedules.

    Returns:
        The weight a, clipped to ``[0, 1]``.

    Raises:
        ValueError: an unknown schedule, or a missing or non-positive E or p where the schedule needs it.
        TypeError: a base that is not a real number.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    a0 = as_alpha(base, check_range=False)
    e = float(epoch)
    a = a0 if schedule == "constant" else _scheduled(schedule, a0, e, total_epochs, period)
    return min(1.0, max(0.0, a))


def _scheduled(schedule: str, a0: float, e: float, total_epochs: Optional[int], period: Optional[float]) -> float:
    """The weight of a schedule other than "constant" at epoch e, before clipping (alpha_at's formulas)."""
    needs_total = schedule != "cosine"
    needs_period = schedule.startswith("cosine")
    if needs_total and not _finite_positive(total_epochs):
        raise ValueError(f"alpha schedule {schedule!r} needs total_epochs > 0, got {total_epochs!r}")
    if needs_period and not _finite_positive(period):
        raise ValueError(f"alpha schedule {schedule!r} needs a finite period > 0 (in epochs), got {period!r}")
    ramp = e / float(total_epochs) if needs_total else 1.0
    wave = 0.5 * (1.0 - math.cos(2.0 * math.pi * e / float(period))) if needs_period else 1.0
    if schedule == "linear-increase":
        return a0 * ramp
    if schedule == "linear-decrease":
        return a0 * (1.0 - ramp)
    if schedule == "cosine":
        return a0 * wave
    if schedule in ("cosine-linear", "cosine-linear-increase"):
        return a0 * wave * ramp
    return a0 * (1.0 - wave * ramp)  # cosine-linear-decrease
