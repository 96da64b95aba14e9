"""The package's source, read with ``ast``: no import cycle among haframe_ext modules, no private names across
them, and no loading of user files that could unpickle code."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import haframe_ext

PACKAGE = Path(__file__).resolve().parents[1] / "haframe_ext"


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    """``haframe_ext/data/images.py`` -> ``data.images``; a package's ``__init__.py`` is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _shown(module: str) -> str:
    return module or "__init__"


def _modules(root: Path = PACKAGE) -> Dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The package-relative name a ``from <level dots><module> import`` in ``importer`` refers to."""
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + (module.split(".") if module else []))


def _imports(modules: Dict[str, Path]) -> List[Tuple[str, str, str, int]]:
    """Every import of a haframe_ext module by another, lazy ones inside functions too:
    (importer, imported module, imported name or "" for a whole module, line)."""
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = _resolve(name, is_package, node.level, node.module)
                elif node.module and (node.module == "haframe_ext" or node.module.startswith("haframe_ext.")):
                    target = node.module[len("haframe_ext."):] if "." in node.module else ""
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in modules:  # from . import x: the module x
                        found.append((name, sub, "", node.lineno))
                    else:
                        found.append((name, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("haframe_ext."):
                        found.append((name, alias.name[len("haframe_ext."):], "", node.lineno))
    return found


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle():
    modules = _modules()
    edges: Dict[str, Set[str]] = {}
    why: Dict[Tuple[str, str], List[str]] = {}
    for importer, target, name, line in _imports(modules):
        if target == importer or target not in modules:
            continue
        if modules[target].name == "__init__.py" and (target == "" or importer.startswith(target + ".")):
            continue  # Python imports a module's package first anyway: reading its face (__version__) adds no edge
        edges.setdefault(importer, set()).add(target)
        why.setdefault((importer, target), []).append(f"{name or '<module>'} (line {line})")
    cycles = _cycles(edges)
    lines = []
    for comp in cycles:
        lines.append("cycle: " + ", ".join(comp))
        for a in comp:
            for b in comp:
                if b in edges.get(a, ()):
                    lines.append(f"  {a} -> {b}: {', '.join(why[(a, b)])}")
    assert not cycles, "haframe_ext's import graph has cycles (break each by moving the shared names down):\n" + \
        "\n".join(lines)


def test_no_private_names_across_modules():
    modules = _modules()
    bad = [f"{_shown(importer)} (line {line}) imports {name} from {_shown(target)}"
           for importer, target, name, line in _imports(modules)
           if name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and target != importer]
    bad += [f"{_shown(importer)} (line {line}) imports {name or 'the module'} from the private module {target}"
            for importer, target, name, line in _imports(modules)
            if any(part.startswith("_") and not part.startswith("__") for part in target.split("."))]
    assert not bad, ("haframe_ext modules import private names of other modules (make the name public where it is "
                     "defined, or keep its use inside that module):\n" + "\n".join(bad))


def test_the_reader_sees_every_import(tmp_path):
    """The checks above see ``from . import x``, lazy imports inside functions, subpackages and absolute imports."""
    (tmp_path / "data").mkdir()
    (tmp_path / "__init__.py").write_text("from .a import run\n")
    (tmp_path / "a.py").write_text("from . import b\n\ndef run():\n    from .data.images import _load\n")
    (tmp_path / "b.py").write_text("import haframe_ext.a\nfrom haframe_ext import __version__\n")
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "data" / "images.py").write_text("from ..b import thing\n")
    found = {(a, b, n) for a, b, n, _ in _imports(_modules(tmp_path))}
    assert found == {("", "a", "run"), ("a", "b", ""), ("a", "data.images", "_load"), ("b", "a", ""),
                     ("b", "", "__version__"), ("data.images", "b", "thing")}
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}, "d": {"d"}}) == [["a", "b"], ["d"]]



PKG = Path(haframe_ext.__file__).resolve().parent


def test_package_source_never_unpickles_user_files():
    """Static guard: every torch.load passes weights_only=True, every np.load allow_pickle=False, and no
    pickle.load/loads/Unpickler is used except the restricted CifarUnpickler."""
    problems = []
    for path in sorted(PKG.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and node.func.attr == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    problems.append(f"{where}: np.load without allow_pickle=False")
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                problems.append(f"{where}: pickle.{node.func.attr}")
    assert not problems, problems

