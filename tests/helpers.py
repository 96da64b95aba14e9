"""Helpers shared by the test files: loss inputs, the float64 reference, the CLI runner, hostile pickles,
random trees (hypothesis), and the tiny training run with its fault hook.

Test files import from here (and from ``_torchrun``), never from one another.
"""

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from haframe_ext import ops
from haframe_ext.training.checkpoint import seal_checkpoint
from haframe_ext.hierarchy import HierarchyError
from haframe_ext.train import TrainConfig, load_checkpoint


def make_inputs(B, K, d, dtype=torch.float32, device="cpu", seed=0, scale=3.0, ignore_row=True):
    """Features [B, d] of norm ~scale, unit-row weights [K, d] (a frame-like matrix), labels [B].

    With ``ignore_row`` and B > 2, row 1 carries the default ignore_index (-100).
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(max(d, 1)))
    w = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, K, (B,), generator=g)
    if ignore_row and B > 2:
        y[1] = -100
    return h.to(dtype).to(device), w.to(dtype).to(device), y.to(device)


def reference_loss_and_grad(h, w, y, alpha=0.4, reduction="none", ignore_index=-100, grad_out=None):
    """The float64 reference loss and feature gradient on the same (rounded) inputs, on the CPU."""
    h64 = h.detach().double().cpu().requires_grad_()
    loss = ops.reference_loss(h64, w.double().cpu(), y.cpu(), alpha, reduction, ignore_index)
    go = torch.ones_like(loss) if grad_out is None else grad_out.double().cpu()
    loss.backward(go)
    return loss.detach(), h64.grad


def run_cli(*args, timeout=120, env=None, cwd=None):
    """``python -m haframe_ext.cli ARGS`` in a fresh process: the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "haframe_ext.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


class HostileGlobal:
    """An object whose unpickling would call ``os.system(command)``: loaders must refuse it, never run it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_hostile_pickle(path, command: str, wrap=lambda x: x) -> None:
    """Pickle ``wrap(HostileGlobal(command))`` to path (protocol 2, as torch and numpy files use)."""
    with open(path, "wb") as fh:
        pickle.dump(wrap(HostileGlobal(command)), fh, protocol=2)


# ----------------------------------------------------------------------------- random trees (hypothesis)
FAST = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def node_name(i: int, style: str) -> str:
    """Node name for integer id i in one of several styles (plain, with spaces, non-ASCII, long)."""
    if style == "plain":
        return f"n{i}"
    if style == "spaces":
        return f"node {i} of the tree"
    if style == "unicode":
        return f"ñœ-{i}-日本"
    return f"long{i}-" + "x" * 300


def tree_parents(kind: str, K: int, rng: np.random.Generator) -> dict[int, int]:
    """child -> parent over integer ids (root 0) of a tree with exactly K leaves."""
    parent: dict[int, int] = {}
    if kind == "balanced":
        b = int(rng.integers(2, 6))
        levels = max(1, int(math.floor(math.log(max(K, 2), b))))
        frontier, nxt = [0], 1
        for _ in range(levels):
            new = []
            for p in frontier:
                for _ in range(b):
                    parent[nxt] = p
                    new.append(nxt)
                    nxt += 1
            frontier = new
        return parent
    if kind == "star":
        return {i: 0 for i in range(1, K + 1)}
    if kind == "caterpillar":  # deepest possible: a spine with one leaf per spine node
        spine = list(range(K - 1))  # node 0 is the root
        nxt = K - 1
        for s in spine[1:]:
            parent[s] = s - 1
        for s in spine:
            parent[nxt] = s
            nxt += 1
        parent[nxt] = spine[-1]
        return parent
    # "random": agglomerate K leaves into random groups of 2-4, sometimes through a unary chain
    roots = list(range(1, K + 1))
    nxt = K + 1
    while len(roots) > 1:
        g = int(min(len(roots), rng.integers(2, 5)))
        pick = rng.choice(len(roots), size=g, replace=False)
        group = [roots[i] for i in pick]
        roots = [r for i, r in enumerate(roots) if i not in set(pick.tolist())]
        p = nxt
        nxt += 1
        for c in group:
            parent[c] = p
        while rng.random() < 0.2:  # unary node above p: heights count the longest path
            parent[p] = nxt
            p = nxt
            nxt += 1
        roots.append(p)
    # relabel so the root is 0
    root = roots[0]
    swap = {root: 0, 0: root}
    return {swap.get(c, c): swap.get(p, p) for c, p in parent.items()}


@st.composite
def trees(draw, max_k: int = 2000, styles=("plain", "spaces", "unicode", "long")):
    """(parent_of by name, classes in a random label order) for a random tree with 2..max_k leaves."""
    kind = draw(st.sampled_from(["balanced", "star", "caterpillar", "random"]))
    cap = min(max_k, 300) if kind == "caterpillar" else max_k  # depth K-1: keep the example cheap
    K = draw(st.integers(2, cap))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(styles))
    rng = np.random.default_rng(seed)
    ids = tree_parents(kind, K, rng)
    parent_of = {node_name(c, style): node_name(p, style) for c, p in ids.items()}
    kids = set(parent_of.values())
    leaves = [c for c in parent_of if c not in kids]
    order = rng.permutation(len(leaves))
    return parent_of, [leaves[i] for i in order]


def edge_text(parent_of) -> str:
    return "".join(f"{p}\t{c}\n" for c, p in parent_of.items())


def raises_hierarchy_error(fn, *keywords):
    """Assert fn raises exactly HierarchyError with a non-empty message containing every keyword."""
    with pytest.raises(HierarchyError) as info:
        fn()
    assert type(info.value) is HierarchyError and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    for k in keywords:
        assert k in msg, f"{k!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- the tiny training run and its fault hook
# A run that must be killed goes through FAULT, a wrapper script (written to tmp_path) that installs a timing hook
# in haframe_ext.training.loop / haframe_ext.files and then calls haframe_ext.cli.main: the hook never changes a
# value, it only stalls the process (so a test can SIGKILL it at a known point) or SIGKILLs it from inside a checkpoint
# write.  Resumes and the uninterrupted baseline (conftest.py) run the plain ``python -m haframe_ext.cli``.
REPO = Path(__file__).resolve().parents[1]
TOY_EDGES = "".join(f"{p}\t{c}\n" for p, c in [
    ("root", "A"), ("root", "B"), ("A", "A1"), ("A", "A2"), ("B", "B1"), ("B", "B2"),
    ("A1", "c0"), ("A1", "c1"), ("A2", "c2"), ("A2", "c3"), ("B1", "c4"), ("B1", "c5"), ("B2", "c6"), ("B2", "c7")])


EPOCHS = 3


STEPS_PER_EPOCH = 6  # 8 classes x 12 samples / batch 16


def toy_config(folder: Path) -> dict:
    """The tiny run the training fault tests use (3 epochs of 6 steps, a few seconds)."""
    return dict(method="haframe", dataset="synthetic", hierarchy=str(folder / "toy.tsv"), backbone="mlp", hidden=16,
                input_dim=8, n_per_class=12, eval_per_class=6, difficulty=1.0, epochs=EPOCHS, batch_size=16,
                eval_batch_size=64, lr=0.05, progress=False, tensorboard=False, eval_ks=[1, 2, 5])


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.tsv").write_text(TOY_EDGES)
    cfg = folder / "cfg.json"
    cfg.write_text(json.dumps(toy_config(folder)))
    return cfg


def cli(*args, timeout=120):
    return run_cli(*args, timeout=timeout, env=env(), cwd=str(REPO))


FAULT = textwrap.dedent('''
    """Run the haframe CLI with a fault hook that never changes a value (see tests/helpers.py)."""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    import haframe_ext.files as C
    import haframe_ext.training.loop as L
    from haframe_ext import cli

    mode, out, marker = os.environ["HF_FAULT"], Path(os.environ["HF_OUT"]), Path(os.environ["HF_MARKER"])
    calls = {"after_ckpt": 0, "all": 0, "write_last": 0}
    real_loss, real_write, real_replace = L.compute_loss, C._write_tmp, os.replace

    def loss_hook(criterion, features, logits, target):
        calls["all"] += 1
        if (out / "last.pt").exists():
            calls["after_ckpt"] += 1
        loss = real_loss(criterion, features, logits, target)
        if mode == "stall_epoch2" and calls["after_ckpt"] == 3:      # 2 steps of epoch 2 done
            marker.write_text("epoch 2, step 3")
            time.sleep(600)
        if mode == "nan_epoch2" and calls["after_ckpt"] >= 1:
            loss = loss * float("nan")
        if mode == "nan_grad_end_of_epoch2" and calls["all"] == 2 * %d:
            loss = loss + 0.0 * torch.sqrt((features * 0).sum())    # finite loss, NaN gradient
        return loss

    def write_hook(obj, path):
        tmp = real_write(obj, path)
        if mode == "kill_in_write" and Path(path).name == "last.pt":
            calls["write_last"] += 1
            if calls["write_last"] == 2:                               # epoch 2's temp file is complete
                os.kill(os.getpid(), signal.SIGKILL)
        return tmp

    def replace_hook(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if mode == "kill_between_renames" and Path(dst).name == "prev.pt":
            os.kill(os.getpid(), signal.SIGKILL)                       # last.pt -> prev.pt done, tmp not renamed

    L.compute_loss, C._write_tmp, os.replace = loss_hook, write_hook, replace_hook
    sys.exit(cli.main(sys.argv[1:]))
''' % STEPS_PER_EPOCH)


def start_fault(tmp: Path, mode: str, out: Path, cfg: Path) -> subprocess.Popen:
    script = tmp / "fault.py"
    script.write_text(FAULT)
    e = dict(env(), HF_FAULT=mode, HF_OUT=str(out), HF_MARKER=str(tmp / "marker"))
    return subprocess.Popen([sys.executable, str(script), "train", "--config", str(cfg), "--out", str(out)],
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def wait_for(path: Path, proc: subprocess.Popen, timeout=90.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {path.name}: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_same_run(out_a: Path, out_b: Path):
    """Final weights, optimizer state, history and test metrics identical, bit for bit."""
    a, b = load_checkpoint(out_a / "last.pt"), load_checkpoint(out_b / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), k
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    ba, bb = load_checkpoint(out_a / "best.pt", kind="best"), load_checkpoint(out_b / "best.pt", kind="best")
    assert all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (out_a, out_b))
    for key in ("test", "test_crm", "best_epoch", "best_val", "neural_collapse", "frame"):
        assert ra[key] == rb[key], key



def damage_checkpoint(kind: str, last: Path, tmp: Path):
    """Damage the checkpoint file ``last`` in one of the ways listed in test_checkpoint.CORRUPTIONS."""
    data = bytearray(last.read_bytes())
    if kind == "truncated_to_1_byte":
        last.write_bytes(bytes(data[:1]))
    elif kind == "empty":
        last.write_bytes(b"")
    elif kind == "truncated_tail":
        last.write_bytes(bytes(data[:-100]))
    elif kind == "random_bytes":
        last.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "text_file":
        last.write_text('{"epoch": 2}\n')
    elif kind == "zeroed_block":
        mid = len(data) // 2
        data[mid:mid + 256] = bytes(256)
        last.write_bytes(bytes(data))
    elif kind == "edited_epoch":  # a well-formed file whose content no longer matches its digest
        ck = torch.load(last, weights_only=True)
        ck["epoch"] = 7
        torch.save(ck, last)
    elif kind == "edited_weight":
        ck = torch.load(last, weights_only=True)
        k = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][k] = ck["model"][k] + 1e-6
        torch.save(ck, last)
    elif kind == "foreign_torch_file":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, last)
    elif kind == "missing_keys":  # a resealed checkpoint without its optimizer state
        ck = torch.load(last, weights_only=True)
        ck.pop("digest")
        ck.pop("optimizer")
        torch.save(seal_checkpoint(ck), last)
    else:
        raise AssertionError(kind)


def hostile_touch(marker="pwned-by-pickle"):
    """Unpickling this would run a shell command that creates a marker file."""
    return HostileGlobal(f"touch {marker}")


def toy_train_config(folder: Path, **kw) -> TrainConfig:
    """The tiny run as a TrainConfig writing to folder/run (toy.tsv written if missing), with overrides."""
    (folder / "toy.tsv").write_text(TOY_EDGES) if not (folder / "toy.tsv").exists() else None
    base = dict(toy_config(folder), out=str(folder / "run"))
    base.update(kw)
    return TrainConfig.from_dict(base)


# ----------------------------------------------------------------------------- independent float64 references
def brute_tree_distances(h, convention: str) -> np.ndarray:
    """d [K, K] float64 of a Hierarchy whose classes are leaves, by walking parent links (no library distance code):
    'published' D - depth(LCA) with D the deepest class's depth, 'height' the longest path down from the LCA."""
    parent = {n: h.parent(n) for n in h.nodes}
    up = {}  # node -> [node, parent, ..., root]
    for n in parent:
        path, v = [], n
        while v is not None:
            path.append(v)
            v = parent[v]
        up[n] = path
    height = dict.fromkeys(parent, 0)
    for n in sorted(parent, key=lambda v: -len(up[v])):  # deepest first: children before parents
        if parent[n] is not None:
            height[parent[n]] = max(height[parent[n]], height[n] + 1)
    classes = list(h.classes)
    assert all(height[c] == 0 for c in classes), "brute_tree_distances needs classes at leaves"
    D = max(len(up[c]) - 1 for c in classes)
    K = len(classes)
    d = np.zeros((K, K))
    for a in range(K):
        anc = set(up[classes[a]])
        for b in range(a + 1, K):
            lca = next(v for v in up[classes[b]] if v in anc)
            d[a, b] = d[b, a] = height[lca] if convention == "height" else D - (len(up[lca]) - 1)
    return d


def brute_similarity(d: np.ndarray, gamma: float):
    """(S [K, K], s_min) in float64 from distances d: E = exp(-gamma d / d_max), s_min = -1 / (1^T E^-1 1 - 1)
    clipped to >= -1 by a dense solve, S = (1 - s_min) E + s_min with a unit diagonal."""
    E = np.exp(-gamma * d / d.max())
    ones = np.ones(len(d))
    q = float(ones @ np.linalg.solve(E, ones))
    s = max(-1.0 / (q - 1.0), -1.0)
    S = (1.0 - s) * E + s
    np.fill_diagonal(S, 1.0)
    return S, s
