"""The public API is typed and documented: every callable that ``haframe_ext``, ``haframe_ext.nn`` and
``haframe_ext.metrics`` list in ``__all__`` (for a class: its ``__init__`` and the public methods it or a package base
defines) annotates every parameter and its return, and has a Google-style docstring with ``Args:`` (when it takes
parameters) and ``Returns:`` (when it returns something other than None)."""

from __future__ import annotations

import inspect
from typing import Callable, Iterator, List, Tuple

import pytest

import haframe_ext
import haframe_ext.metrics
import haframe_ext.nn

API_MODULES = (haframe_ext, haframe_ext.nn, haframe_ext.metrics)
_SKIPPED_PARAMS = ("self", "cls")


def _ours(func: Callable) -> bool:
    return getattr(func, "__module__", "").split(".")[0] == "haframe_ext"


def _methods(cls: type) -> Iterator[Tuple[str, Callable]]:
    """``__init__`` and the public methods (static and class methods too, not properties) that cls or a base class
    defined in the package provides, each once (the one the class resolves to)."""
    seen = set()
    for klass in cls.__mro__:
        for name, raw in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if name.startswith("_") and name != "__init__":
                continue
            func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            if inspect.isfunction(func) and _ours(func):
                yield name, func


def api_callables(modules=API_MODULES) -> List[Tuple[str, Callable]]:
    """(qualified name, function) of every callable the modules' __all__ list, classes expanded to their methods."""
    out = []
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            where = f"{module.__name__}.{name}"
            if inspect.isclass(obj):
                out += [(f"{where}.{method}", func) for method, func in _methods(obj)]
            elif inspect.isfunction(obj):
                out.append((where, obj))
    return out


def _returns_none(annotation) -> bool:
    return annotation is None or annotation is type(None) or annotation in ("None", "NoReturn")


def problems(func: Callable) -> List[str]:
    """What the function's signature and docstring miss (empty when complete)."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values()
              if p.name not in _SKIPPED_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    out = [f"parameter {p.name!r} has no annotation" for p in params if p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        out.append("the return has no annotation")
    doc = inspect.getdoc(func) or ""
    if not doc:
        out.append("no docstring")
    if params and "Args:" not in doc:
        out.append("the docstring has no Args: section")
    returns_value = sig.return_annotation is not inspect.Signature.empty and not _returns_none(sig.return_annotation)
    if returns_value and func.__name__ != "__init__" and "Returns:" not in doc:
        out.append("the docstring has no Returns: section")
    return out


API = api_callables()


@pytest.mark.parametrize("name,func", API, ids=[name for name, _ in API])
def test_public_callable_is_typed_and_documented(name, func):
    found = problems(func)
    assert not found, f"{name}: " + "; ".join(found)


def test_the_walk_reaches_every_kind_of_member():
    names = {name for name, _ in API}
    assert {"haframe_ext.haframe_loss", "haframe_ext.Hierarchy.__init__", "haframe_ext.Hierarchy.from_edges",
            "haframe_ext.Hierarchy.lca", "haframe_ext.HAFrame.load", "haframe_ext.HAFrame.similarity_rows",
            "haframe_ext.HXELoss.forward", "haframe_ext.nn.HAFrameLoss.set_epoch", "haframe_ext.nn.alpha_at",
            "haframe_ext.metrics.StreamingEvaluator.update", "haframe_ext.metrics.evaluate"} <= names
    assert not any(name.endswith((".num_classes", ".__repr__", "._idx", ".parameters")) for name, _ in API)


def test_the_check_catches_each_gap():
    def untyped(x, y: int = 0):
        """Summary.

        Args:
            x: a value.
            y: another.

        Returns:
            Something.
        """

    def no_sections(x: int) -> int:
        """Summary only."""

    def fine(*args, **kwargs) -> None:
        """Nothing to list."""

    assert problems(untyped) == ["parameter 'x' has no annotation", "the return has no annotation"]
    assert problems(no_sections) == ["the docstring has no Args: section", "the docstring has no Returns: section"]
    assert problems(fine) == []
