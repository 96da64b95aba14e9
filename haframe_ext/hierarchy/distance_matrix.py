"""Distance-matrix input: ``.npy``/``.csv`` files, arrays and tensors, validated into a [K, K] matrix."""

from __future__ import annotations

import os

import numpy as np

from .edges import HierarchyError, numbered_lines, quote, read_text

__all__ = ["read_distance_matrix"]

def _read_csv(path) -> np.ndarray:
    """Read a comma-separated numeric matrix, skipping one optional header line."""
    text, label = read_text(path, "distance CSV")
    rows: list[list[float]] = []
    first = True
    for lineno, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            rows.append([float(f) for f in line.split(",")])
        except ValueError:
            if first:
                first = False
                continue  # the first non-blank line may be a header
            raise HierarchyError(f"{label}, line {lineno}: non-numeric value in {quote(line)}") from None
        first = False
        if len(rows[-1]) != len(rows[0]):
            raise HierarchyError(
                f"{label}, line {lineno}: {len(rows[-1])} values but the first row has {len(rows[0])}; "
                "every row of a distance matrix needs K values")
    if not rows:
        raise HierarchyError(f"{label}: no numeric rows; expected K lines of K comma-separated distances")
    return np.array(rows, dtype=np.float64)


def _fmt(v) -> str:
    """Format one matrix entry for a message (integers without a decimal point)."""
    v = v.item() if hasattr(v, "item") else v
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


_INT64_MAX = int(np.iinfo(np.int64).max)
_FLOAT_EXACT_INT = 2.0 ** 53  # float64 integers up to this are exact, so the int64 cast loses nothing


def _ragged_message(x, exc: Exception) -> str:
    """Error message for an input numpy cannot turn into an array, naming the first row of another length."""
    try:
        lengths = [len(row) for row in x]
    except TypeError:  # not a sequence of sequences
        lengths = []
    for i, n in enumerate(lengths):
        if n != lengths[0]:
            return (f"distance matrix must be square (K, K), but its rows have different lengths: row {i} "
                    f"has {n} entries and row 0 has {lengths[0]}; expected K rows of K numbers")
    return (f"distance matrix must be square (K, K) of numbers, but numpy cannot make an array of it "
            f"({exc}); expected K rows of K numbers")


def _as_array(x) -> np.ndarray:
    """The raw array of a .npy/.csv path, a torch tensor or an array-like (validated by the caller)."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                raise  # the path itself is wrong, as for a .csv file: the OS error says so
            except (ValueError, EOFError, OSError) as exc:  # empty, truncated, pickled or not .npy at all
                raise HierarchyError(
                    f"distance file {quote(path)}: not a readable .npy array; cannot load without pickle "
                    f"({type(exc).__name__}: {str(exc) or 'no data'}); write the [K, K] matrix with "
                    "numpy.save(path, d)") from None
        elif ext == ".csv":
            arr = _read_csv(path)
        else:
            raise HierarchyError(f"distance file {quote(path)}: unknown extension {quote(ext)}; "
                                 "use a .npy or .csv file")
    elif type(x).__module__.startswith("torch"):
        t = x.detach().cpu()
        arr = (t.double() if t.is_floating_point() else t).numpy()
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists: "inhomogeneous shape"
            raise HierarchyError(_ragged_message(x, exc)) from None
    return arr


def read_distance_matrix(x) -> np.ndarray:
    """Validate class distances and return them as a new [K, K] array, int64 if all integer-valued else float64.

    Accepts a numpy array (or nested list), a torch tensor, or a path to a ``.npy``
    (loaded without pickle) or ``.csv`` (comma-separated, optional header line) file.  Float
    matrices may be asymmetric or off the zero diagonal by rounding (1e-12 of the largest
    distance); they are then symmetrised and the diagonal set to 0.  Integer-valued floats
    become int64 only up to 2**53 (where float64 integers are exact); larger ones stay float64.
    Unsigned integers above the int64 maximum are refused rather than wrapped.
    """
    arr = _as_array(x)
    if arr.dtype.kind not in "iuf":
        raise HierarchyError(f"distance matrix must be numeric (integers or floats), got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise HierarchyError(f"distance matrix must be square 2-D (K, K), got shape {arr.shape}")
    K = arr.shape[0]
    if K < 2:
        raise HierarchyError(f"distance matrix must have at least 2 classes, got K={K}")
    is_float = arr.dtype.kind == "f"
    if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:  # would wrap to a negative int64
        i, j = np.argwhere(arr > _INT64_MAX)[0]
        raise HierarchyError(
            f"distance matrix entry d[{i},{j}]={_fmt(arr[i, j])} is too large: {arr.dtype} distances must "
            f"be at most {_INT64_MAX} (the int64 maximum); rescale the distances")
    d = arr.astype(np.float64 if is_float else np.int64)  # a copy
    if is_float:
        bad = np.argwhere(~np.isfinite(d))
        if len(bad):
            i, j = bad[0]
            raise HierarchyError(
                f"distance matrix is not finite: d[{i},{j}]={d[i, j]} (NaN/Inf); every entry must be a number")
        tol = 1e-12 * max(float(np.abs(d).max()), 1.0)
    else:
        tol = 0
    bad = np.argwhere((np.abs(d - d.T) > tol) if is_float else (d != d.T))  # d - d.T may wrap for int64
    if len(bad):
        i, j = bad[0]
        raise HierarchyError(
            f"distance matrix is not symmetric: d[{i},{j}]={_fmt(d[i, j])} but d[{j},{i}]={_fmt(d[j, i])}")
    bad = np.flatnonzero(np.abs(np.diagonal(d)) > tol)
    if len(bad):
        i = bad[0]
        raise HierarchyError(
            f"distance matrix has a non-zero diagonal: d[{i},{i}]={_fmt(d[i, i])}; "
            "a class is at distance 0 from itself")
    bad = np.argwhere(d < 0)
    if len(bad):
        i, j = bad[0]
        raise HierarchyError(
            f"distance matrix has a negative entry: d[{i},{j}]={_fmt(d[i, j])}; distances must be >= 0")
    if is_float:
        # Halve before adding: (d + d.T) / 2 overflows to inf near the float64 maximum.  Symmetric
        # entries are kept bit for bit; the others get a mean that is the same for (i, j) and (j, i).
        d = np.where(d == d.T, d, 0.5 * d + 0.5 * d.T)
        np.fill_diagonal(d, 0.0)
        # int64 only where every value is an integer that float64 holds exactly (|v| <= 2**53):
        # beyond that the cast could overflow or the values were rounded anyway, so keep float64.
        if d.max() <= _FLOAT_EXACT_INT and np.array_equal(d, np.round(d)):
            d = d.astype(np.int64)
    return d
