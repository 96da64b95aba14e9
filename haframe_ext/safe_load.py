"""One-line reasons for a failed ``torch.load(weights_only=True)``, without torch's advice to load unsafely."""

from __future__ import annotations

import re
from typing import Tuple

__all__ = ["describe_torch_load_error"]

# torch's advice that comes with a failed weights_only load ("Re-running `torch.load` with `weights_only` set
# to `False` will likely succeed ..."): false for a damaged file and unsafe for a hostile one, so never shown
_UNSAFE_ADVICE = re.compile(r"weights_only\W*(?:set\s+to\W*|=\s*)False|arbitrary code execution|trusted source|"
                            r"trust the source|add_safe_globals|safe_globals|allowlist|file an issue|"
                            r"Weights only load failed|two options|documentation of torch\.load", re.I)
# well-formed pickles that ask for something the weights-only unpickler refuses (code, arbitrary classes)
_REFUSED = re.compile(r"Trying to call reduce for unrecognized function|Can only (?:create new object|build)|"
                      r"Cannot use ``weights_only=True`` with (?:TorchScript archives|files saved in the legacy \.tar)")


def describe_torch_load_error(exc: BaseException) -> Tuple[str, bool]:
    """``(reason, unsafe)`` for an exception raised by ``torch.load(path, weights_only=True)``.

    ``unsafe`` is True when the file is a readable pickle that asks for something the weights-only
    unpickler refuses (a global such as ``posix.system``, an arbitrary class, a TorchScript archive):
    the file is not a *safe* torch file, as opposed to a corrupted, truncated or foreign one.
    ``reason`` is one line without torch's advice to retry with ``weights_only=False`` (wrong for a
    damaged file, dangerous for a hostile one).
    """
    text = str(exc)
    m = re.search(r"GLOBAL\s+(\S+?)(?:\s+whose module|\s+was not an allowed global|\s|$)", text)
    if m:
        return f"it asks for the global {m.group(1)}", True
    inner = text.rsplit("WeightsUnpickler error:", 1)[-1]
    m = _REFUSED.search(inner)
    if m:
        what = inner[m.start():].split("``torch.load``")[0]
        what = " ".join(what.split()).rstrip(". ")
        what = re.sub(r"\s*(?:via|allowlisted via)\s*`add_safe_globals`", "", what)
        if "TorchScript" in what:
            what = "it is a TorchScript archive"
        elif "legacy .tar" in what:
            what = "it is in torch's legacy .tar format"
        return what, True
    if isinstance(exc, EOFError):
        return "the file ends early", False
    if isinstance(exc, KeyError):  # the legacy (non-zip) unpickler reading a text or other non-torch file
        return f"the legacy torch unpickler failed with KeyError {text}", False
    sentences = re.split(r"(?<=[.!?])\s+|\n+", inner)
    keep = [s.strip() for s in sentences if s.strip() and not _UNSAFE_ADVICE.search(s)]
    detail = " ".join(keep[0].split()).rstrip(".") if keep else ""  # the first sentence says what failed
    if not detail:
        detail = type(exc).__name__
    elif len(detail) > 300:
        detail = detail[:297] + "..."
    if re.fullmatch(r"Unsupported operand \d+", detail):
        detail = f"unpickling stopped at an unsupported opcode {detail.split()[-1]}"
    return detail, False
