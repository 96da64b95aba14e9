"""Loads the compiled extension (haframe_ext._C) once and reports why when it cannot."""

import importlib.util
import os
import warnings
from typing import Optional

import torch

_ERROR = None
_LOADED = False


def _load() -> None:
    global _ERROR, _LOADED
    if os.environ.get("HAFRAME_DISABLE_NATIVE", "") not in ("", "0"):
        _ERROR = "disabled by HAFRAME_DISABLE_NATIVE"
        return
    try:
        spec = importlib.util.find_spec("haframe_ext._C")
        if spec is None or spec.origin is None:
            raise ImportError(
                "haframe_ext._C not found: the package was not built "
                "(run `pip install --no-build-isolation -e .`; importing from the source tree "
                "without an editable install has no compiled extension)"
            )
        torch.ops.load_library(spec.origin)
        _LOADED = True
    except (ImportError, OSError, RuntimeError) as exc:  # a torch/extension mismatch raises OSError
        _ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"haframe_ext: compiled extension unavailable ({_ERROR}); using the pure-PyTorch "
            "reference paths, which are slower and use more memory.",
            RuntimeWarning,
            stacklevel=3,
        )


def native_available() -> bool:
    """True when the compiled C++/CUDA extension is loaded.

    Returns:
        Whether haframe_ext._C was loaded at import (False when it is missing, mismatched or disabled by
        HAFRAME_DISABLE_NATIVE); without it every loss takes its plain-PyTorch reference path.
    """
    return _LOADED


def native_error() -> Optional[str]:
    """Why the extension is not loaded (None when it is).

    Returns:
        One line naming the cause (the exception's type and message, or the environment variable), or None.
    """
    return _ERROR


_load()
