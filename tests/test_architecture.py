"""The package's source, read with ``ast``: no import cycle among haframe_ext modules, no private names across
them, no import from a higher layer, every name imported from the module that defines it, and no loading of user files
that could unpickle code."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

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


# The package's layers, lowest first, each named by its first path component. A module imports only from its own
# layer and the ones before it; the package's __init__.py (the public face) stands above them all.
LAYERS = (
    ("startup", "sizes", "safe_load", "files"),  # shared by every stage
    ("hierarchy",),  # hierarchy input, the tree and its distances, tree operators
    ("frame", "ops", "metrics"),  # frames, the compiled ops and their Python faces, metrics: each on the hierarchy
    ("nn", "layers", "schedules"),  # modules built on the ops: the classifier and loss, the layers, alpha schedules
    ("training",),  # the trainer's parts and the datasets
    ("train",),  # the trainer's entry points
    ("cli",),  # the haframe command
)


def _layer(module: str, layers=LAYERS) -> int:
    """The index of a package-relative module's layer; len(layers) for the package's face, -1 when unplaced."""
    if module == "":
        return len(layers)
    head = module.split(".")[0]
    return next((i for i, names in enumerate(layers) if head in names), -1)


def _upward_imports(modules: Dict[str, Path], layers=LAYERS) -> List[str]:
    """Imports of a module from a higher layer than the importer's, and modules in no layer."""
    bad = [f"{_shown(m)} is in no layer of LAYERS" for m in modules if _layer(m, layers) < 0]
    for importer, target, name, line in _imports(modules):
        if target not in modules or (modules[target].name == "__init__.py" and
                                     (target == "" or importer.startswith(target + "."))):
            continue  # the face of a package the importer is in (__version__) is loaded before the importer anyway
        if _layer(target, layers) > _layer(importer, layers) >= 0:
            bad.append(f"{_shown(importer)} (line {line}) imports {name or 'the module'} from the higher layer "
                       f"{_shown(target)}")
    return bad


def _defined(path: Path) -> Set[str]:
    """The names a module's top level defines itself (functions, classes, assignments, also inside a top-level
    if/try/with); names it imports are not among them."""
    found: Set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    found.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            for block in ("body", "orelse", "finalbody", "handlers"):
                if isinstance(node, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) and hasattr(node, block):
                    visit(getattr(node, block))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    return found


def _not_from_the_definer(modules: Dict[str, Path]) -> List[str]:
    """Imports of a name from a module that does not define it (it only hands it on), and imports of a package's face
    as a module by anything but another face."""
    defined = {m: _defined(p) for m, p in modules.items()}
    bad = []
    for importer, target, name, line in _imports(modules):
        if target not in modules:
            continue
        if name and name not in defined[target]:
            bad.append(f"{_shown(importer)} (line {line}) imports {name} from {_shown(target)}, "
                       "which does not define it")
        elif not name and modules[target].name == "__init__.py" and modules[importer].name != "__init__.py":
            bad.append(f"{_shown(importer)} (line {line}) imports the package {_shown(target)} as a module")
    return bad


def test_no_import_from_a_higher_layer():
    bad = _upward_imports(_modules())
    assert not bad, ("haframe_ext modules import from a higher layer (move the shared names down, or place a new "
                     "module in LAYERS):\n" + "\n".join(bad))


def test_names_are_imported_from_the_module_that_defines_them():
    bad = _not_from_the_definer(_modules())
    assert not bad, ("haframe_ext modules import names from a module that only hands them on (import from the "
                     "defining module; a package's __init__.py is the face for users, not for the package):\n"
                     + "\n".join(bad))


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


def test_the_layer_and_definer_checks_catch_each_form(tmp_path):
    (tmp_path / "low").mkdir()
    (tmp_path / "__init__.py").write_text("from .low.core import Thing\n")
    (tmp_path / "low" / "__init__.py").write_text("from .core import Thing\n")
    (tmp_path / "low" / "core.py").write_text("from ..base import helper\n\nclass Thing:\n    pass\n\n"
                                              "def f():\n    from ..high import run\n")
    (tmp_path / "base.py").write_text("import os\n\ntry:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n"
                                      "helper = 1\n")
    (tmp_path / "high.py").write_text("from .low import Thing\nfrom . import low\nfrom .base import os\n\n"
                                      "def run():\n    pass\n")
    (tmp_path / "loose.py").write_text("")
    modules = _modules(tmp_path)
    layers = (("base",), ("low",), ("high",))
    assert _upward_imports(modules, layers) == ["loose is in no layer of LAYERS",
                                                "low.core (line 7) imports run from the higher layer high"]
    assert _not_from_the_definer(modules) == [
        "high (line 1) imports Thing from low, which does not define it",
        "high (line 2) imports the package low as a module",
        "high (line 3) imports os from base, which does not define it"]
    assert _defined(tmp_path / "base.py") == {"fcntl", "helper"}



# ----------------------------------------------------------------------------- sizes: one job per file, short functions
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _long_modules(root: Path = PACKAGE, limit: int = MAX_MODULE_LINES) -> List[str]:
    """The modules under root with more than ``limit`` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root).as_posix()}: {n} lines")
    return out


def _long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> List[str]:
    """The functions and methods under root, nested ones too, longer than ``limit`` lines (from ``def`` to their
    last line: end_lineno - lineno + 1)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name}: {n} lines")
    return sorted(out)


def test_no_module_over_the_line_limit():
    long = _long_modules()
    assert not long, (f"haframe_ext modules over {MAX_MODULE_LINES} lines (split each by job into a sibling module, "
                      "importing moved public names back where users import them):\n" + "\n".join(long))


def test_no_function_over_the_line_limit():
    long = _long_functions()
    assert not long, (f"haframe_ext functions over {MAX_FUNCTION_LINES} lines (split each into named steps):\n"
                      + "\n".join(long))


def test_the_size_checks_catch_each_form(tmp_path):
    """A module one line over the limit, a function one line over, a nested and an async one; the limits themselves
    pass."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "fits.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    (tmp_path / "sub" / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    body = "    pass\n"
    (tmp_path / "funcs.py").write_text(
        "def fits():\n" + body * (MAX_FUNCTION_LINES - 1)
        + "def long():\n" + body * MAX_FUNCTION_LINES
        + "class C:\n    def outer(self):\n        def inner():\n" + "            pass\n" * MAX_FUNCTION_LINES
        + "async def later():\n" + body * MAX_FUNCTION_LINES)
    assert _long_modules(tmp_path) == [f"sub/big.py: {MAX_MODULE_LINES + 1} lines"]
    n = MAX_FUNCTION_LINES + 1
    start = MAX_FUNCTION_LINES + 1  # the line of "def long()"
    outer = start + n
    assert _long_functions(tmp_path) == sorted([
        f"funcs.py:{start} long: {n} lines",
        f"funcs.py:{outer + 1} outer: {n + 1} lines",
        f"funcs.py:{outer + 2} inner: {n} lines",
        f"funcs.py:{outer + 2 + n} later: {n} lines"])


MAX_CXX_FUNCTION_LINES = 80
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _long_cxx_functions(root: Path = CSRC, limit: int = MAX_CXX_FUNCTION_LINES) -> List[str]:
    """The brace blocks under root's C++/CUDA sources outside any other block but namespaces and ``extern "C"``
    (functions, kernels, classes, lambdas at namespace scope) longer than ``limit`` lines, from the line of their
    ``{`` to that of their ``}``; ``//`` comments and string or character literals are ignored."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")):
        lines = path.read_text(encoding="utf-8").splitlines()
        stack: List[Tuple[bool, int]] = []  # (a namespace block, its first line)
        for i, line in enumerate(lines):
            code = re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])*\'', '""', line.split("//")[0])
            for ch in code:
                if ch == "{":
                    stack.append((bool(re.search(r'\bnamespace\b|extern "C"', line)), i))
                elif ch == "}" and stack:
                    is_ns, start = stack.pop()
                    if not is_ns and all(ns for ns, _ in stack) and i - start + 1 > limit:
                        out.append(f"{path.relative_to(root).as_posix()}:{start + 1}: {i - start + 1} lines")
    return out


def test_no_cxx_function_over_the_line_limit():
    long = _long_cxx_functions()
    assert not long, (f"csrc functions over {MAX_CXX_FUNCTION_LINES} lines (split each into named device/host "
                      "steps):\n" + "\n".join(long))


def test_the_cxx_size_check_catches_a_long_function_only(tmp_path):
    fits = "void fits() {\n" + "  x();\n" * (MAX_CXX_FUNCTION_LINES - 2) + "}\n"
    long = ("__global__ void k() {  // a '{' in a comment\n  s = \"}\";\n" + "  x();\n" * (MAX_CXX_FUNCTION_LINES - 2)
            + "}\n")
    (tmp_path / "a.cu").write_text("namespace haframe {\nnamespace {\n" + fits + long + "}  // namespace\n}\n")
    assert _long_cxx_functions(tmp_path) == [f"a.cu:{3 + MAX_CXX_FUNCTION_LINES}: {MAX_CXX_FUNCTION_LINES + 1} lines"]


PKG = Path(haframe_ext.__file__).resolve().parent


# the one class allowed to subclass pickle.Unpickler, and where: it admits only numpy arrays (training/data/cifar.py)
_RESTRICTED_UNPICKLERS = {("training/data/cifar.py", "CifarUnpickler")}
_PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")
_PICKLE_READERS = ("load", "loads", "Unpickler", "open")


def _aliases(tree: ast.AST) -> Dict[str, str]:
    """Local name -> dotted origin for every import in tree (``import numpy as np`` gives np -> numpy)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> str:
    """``np.lib.load`` -> ``numpy.lib.load`` through the imports; "" for anything but a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id)] + parts[::-1])


def _unpickling_problems(source: str, rel: str) -> List[str]:
    """The places in one module's source (rel: its path in the package) that could unpickle a user file."""
    tree = ast.parse(source, filename=rel)
    aliases = _aliases(tree)
    problems = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b, aliases) for b in node.bases}
            allowed = (rel, node.name) in _RESTRICTED_UNPICKLERS
            if any(b.split(".")[0] in _PICKLE_MODULES for b in bases) and not allowed:
                problems.append(f"{where}: class {node.name} subclasses {sorted(bases)}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "torch.serialization.load"):
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                problems.append(f"{where}: {name} without weights_only=True")
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            v = kw.get("allow_pickle")
            if not (isinstance(v, ast.Constant) and v.value is False):
                problems.append(f"{where}: {name} without allow_pickle=False")
        elif name.split(".")[0] in _PICKLE_MODULES and name.rsplit(".", 1)[-1] in _PICKLE_READERS:
            problems.append(f"{where}: {name}")
        elif name == "torch.jit.load":
            problems.append(f"{where}: torch.jit.load runs the archive's code")
    return problems


def test_package_source_never_unpickles_user_files():
    """Static guard over every module, subpackages included: every torch.load passes weights_only=True, every
    np.load allow_pickle=False, and nothing unpickles except the restricted CifarUnpickler."""
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        problems += _unpickling_problems(path.read_text(), path.relative_to(PKG).as_posix())
    assert not problems, problems
    scanned = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")}
    assert {"training/data/cifar.py", "training/data/features.py"} <= scanned  # the user files' loaders are scanned


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "from torch import load as tl\ntl(p, weights_only=flag)",
    "import numpy as np\nnp.load(p)",
    "import numpy\nnumpy.load(p, allow_pickle=True)",
    "import pickle\npickle.loads(b)",
    "from pickle import load\nload(f)",
    "import pickle as pk\npk.Unpickler(f).load()",
    "import pickle\nclass Loose(pickle.Unpickler):\n    pass",
    "import joblib\njoblib.load(p)",
    "import shelve\nshelve.open(p)",
    "import torch\ntorch.jit.load(p)",
])
def test_unpickling_guard_catches_each_unsafe_form(source):
    assert len(_unpickling_problems(source, "data/other.py")) == 1


def test_unpickling_guard_admits_the_safe_forms():
    source = ("import pickle\nimport numpy as np\nimport torch\n"
              "class CifarUnpickler(pickle.Unpickler):\n    pass\n"
              "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n"
              "raise pickle.UnpicklingError('no')\n")
    assert _unpickling_problems(source, "training/data/cifar.py") == []
    assert len(_unpickling_problems(source, "data/images.py")) == 1  # the same class elsewhere is not allowed

