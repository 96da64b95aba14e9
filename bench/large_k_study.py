"""The large-K recipe study (bench/RESULTS.md, "HAFrame at large K"): one screening run per call.

    python bench/large_k_study.py --name hf_auto --taxonomy wordnet:animal --dim 96 --width 96 --epochs 2 \\
        --method haframe --cos-scale auto --gamma 1.5

The trainer's own data, model and frame (``build_from_config``) with a plain SGD loop (momentum 0.9, the
per-step cosine learning rate, batch 64, as ``haframe train``), and the knobs the study varied that the trainer
does not expose: a fixed or learnable scale on the features (a logit scale), the type-II layer's width, an extra
K-wide expansion block, and the frame's node directions (``--align rho``: the class-mean offsets of
haframe_ext.frame.align mixed with Gaussian ones, whitened or not; ``--align 1 --whiten`` is the trainer's
``--frame-directions features``). Validation metrics after each epoch go to stdout and, as one JSON line per epoch, to
``--log``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_large_k import wordnet_subtree
from haframe_ext import ops
from haframe_ext.frame.align import class_feature_means, node_directions
from haframe_ext.frame.profile import Profile, fitted_profile
from haframe_ext.training.config import TrainConfig, build_from_config
from haframe_ext.hierarchy import Hierarchy
from haframe_ext.metrics import StreamingEvaluator
from haframe_ext.nn import TransformationLayerII


class Expand(nn.Module):
    """x + Linear(PReLU(BN(Linear(x, e))), d): a residual block through e hidden units (e = K: per-class storage)."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.up, self.bn, self.act = nn.Linear(d, e, bias=False), nn.BatchNorm1d(e), nn.PReLU(e)
        self.down = nn.Linear(e, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, d]
        return x + self.down(self.act(self.bn(self.up(x))))


def taxonomy_files(spec: str, cache: str):
    """(edge file, classes file) of random:K or wordnet:NAME, written once into cache."""
    os.makedirs(cache, exist_ok=True)
    edges, classes = os.path.join(cache, spec.replace(":", "_") + ".tsv"), os.path.join(cache, spec.replace(":", "_")
                                                                                          + "_classes.txt")
    if not os.path.exists(classes):
        h = wordnet_subtree(spec.split(":", 1)[1]) if spec.startswith("wordnet:") else Hierarchy.random(
            int(spec.split(":", 1)[1]), seed=0)
        h.to_edges(edges)
        h.to_classes(classes)
    return edges, classes


def align_frame(model, crit, h, data, a):
    """Replace the fixed frame by one whose node directions mix the initial features' node offsets (weight
    --align) with Gaussian ones, optionally rotated towards the class means (--align-procrustes)."""
    import numpy as np

    tree, K = h.tree, h.num_classes
    batches = [(data.inputs[j:j + 4096], data.targets[j:j + 4096]) for j in range(0, len(data), 4096)]
    model.eval()
    sums, counts = class_feature_means(lambda x: model.transform(model.backbone(x)), batches, K, len(data))
    fitted = Profile(a.gamma, *fitted_profile(h, sums, counts), weight=a.fit_profile) if a.fit_profile > 0 else None

    def profile(lv):  # S's kernel at level (distance) lv: exp(-gamma lv/d_max), or its mix with a coarse-heavy one
        x = np.asarray(lv, np.float64) / tree.d_max
        hf = np.exp(-a.gamma * x)
        if fitted is not None:  # the library's kernel (trainer: --frame-profile features)
            return fitted(lv, tree.d_max)
        if a.kappa <= 0:
            return hf
        return a.mix * (1.0 - np.expm1(a.kappa * x) / math.expm1(a.kappa)) + (1 - a.mix) * hf

    tree.kernel_values = lambda gamma: profile(tree.level)
    cl = crit.classifier
    W = cl.weight.double().numpy()
    s = tree.exact_s_min(a.gamma)
    if a.align >= 0:
        G = np.random.default_rng(a.seed + 17).standard_normal((tree.num_nodes, a.dim))
        G /= np.linalg.norm(G, axis=1, keepdims=True)
        rho = np.full((tree.num_nodes, 1), a.align)
        if a.shrink > 0:  # a node seen through n samples keeps weight n / (n + shrink) on its data offset
            n = np.asarray(tree.ancestry.T @ counts).reshape(-1, 1)
            rho = rho * n / (n + a.shrink)
        G = np.sqrt(1 - rho) * G + np.sqrt(rho) * node_directions(h, sums, counts, a.seed, whiten=a.whiten)
        W = tree.projected_frame(a.gamma, s, a.dim, a.seed, directions=G / np.linalg.norm(G, axis=1, keepdims=True))
    if a.align_procrustes:  # the rotation R maximising tr(R^T W^T mu)
        U, _, Vt = np.linalg.svd(W.T @ (sums / np.maximum(counts, 1)[:, None]), full_matrices=False)
        W = W @ (U @ Vt)
    state = cl.state_dict()
    state["weight"] = torch.as_tensor(W, dtype=cl.weight.dtype)
    if state.get("similarity") is not None and a.target != "keep":  # K <= 4096: the cosine term's target
        if a.target == "gram":  # what the features can reach: the frame's own cosines
            S = W @ W.T
        else:  # the kernel's exact S
            S = (1 - s) * profile(h.distances()) + s
        np.fill_diagonal(S, 1.0)
        state["similarity"] = torch.as_tensor(S, dtype=cl.weight.dtype)
    cl.load_state_dict(state)
    i, j = np.random.default_rng(0).integers(0, K, (2, 20000))
    i, j = i[i != j], j[i != j]
    got = (W[i] * W[j]).sum(1)
    dij = tree.pair_distances(i, j)
    err = np.abs(got - ((1 - s) * profile(dij) + s))
    for dv in np.unique(dij):
        print(f"d={dv:g}: target {(1 - s) * profile(dv) + s:.3f} got {got[dij == dv].mean():.3f}", flush=True)
    print(json.dumps(dict(align=a.align, whiten=a.whiten, gram_err=float(err.mean()), max_cos=float(got.max()))),
          flush=True)


def main(argv=None) -> int:
    """Train one configuration and log its validation metrics per epoch."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--method", default="haframe", help="haframe | haframe-ce | etf | cross-entropy")
    p.add_argument("--taxonomy", default="wordnet:artifact", help="wordnet:artifact, wordnet:animal or random:K")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=0.4)
    p.add_argument("--cos-scale", default="sum", help="auto, sum or a number (ops.cosine_scale_for)")
    p.add_argument("--feat-scale", type=float, default=1.0, help="features times this before the loss (logit scale)")
    p.add_argument("--norm-scale", type=float, default=0.0,
                   help="> 0: features normalised to this norm before the loss and the logits (a cosine classifier)")
    p.add_argument("--learn-scale", action="store_true", help="learn that scale (no weight decay on it)")
    p.add_argument("--width", type=int, default=0, help="type-II layer width (default: the trainer's rule)")
    p.add_argument("--expand", type=int, default=0, help="append an Expand(dim, this) block to the type-II layer")
    p.add_argument("--align", type=float, default=-1.0,
                   help="rho in [0, 1]: rebuild the frame with node directions mixing the initial features' node "
                        "offsets (weight rho) and Gaussian ones (the default -1 keeps the Gaussian frame)")
    p.add_argument("--shrink", type=float, default=0.0,
                   help="> 0: a node's data-offset weight is rho * n / (n + this), n = training samples under it")
    p.add_argument("--kappa", type=float, default=0.0,
                   help="> 0: S's kernel mixes (weight --mix) 1 - (e^(kappa d/d_max) - 1)/(e^kappa - 1), a "
                        "coarse-heavy kernel, into exp(-gamma d/d_max)")
    p.add_argument("--fit-profile", type=float, default=0.0,
                   help="> 0: S's kernel is frame.profile.Profile with this weight (--frame-profile features: 0.8)")
    p.add_argument("--mix", type=float, default=1.0, help="the coarse-heavy kernel's weight in the profile (--kappa)")
    p.add_argument("--whiten", action="store_true", help="whiten the class means before taking node offsets")
    p.add_argument("--align-procrustes", action="store_true", help="rotate the frame towards the class means")
    p.add_argument("--frame-file", default="",
                   help="a saved [K, d] tensor (--save-classifier) whose normalised rows replace the fixed frame")
    p.add_argument("--save-classifier", default="", help="cross-entropy: save the trained classifier's weight here")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-per-class", type=int, default=12)
    p.add_argument("--target", default="kernel", help="K <= 4096: the cosine term's target: kernel (the exact S of "
                   "the frame's kernel), gram (W W^T of the projected frame) or keep (the Gaussian frame's S)")
    p.add_argument("--difficulty", type=float, default=1.0, help="the synthetic task's noise level")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "haframe_taxonomies"),
                   help="folder for the taxonomy's edge and class files (WordNet-derived: kept out of the repository)")
    p.add_argument("--log", default="bench/results/large_k_screening.jsonl")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    edges, classes = taxonomy_files(a.taxonomy, a.cache)
    cfg = TrainConfig(out=os.devnull, method=a.method, hierarchy=edges, classes=classes, feature_dim=a.dim,
                      gamma=a.gamma, alpha=a.alpha, epochs=a.epochs, n_per_class=a.n_per_class,
                      eval_samples=a.eval_samples, seed=a.seed, difficulty=a.difficulty, lr=a.lr, weight_decay=a.wd)
    cfg.validate()
    built = build_from_config(cfg)
    model, crit, h = built["model"], built["criterion"], built["hierarchy"]
    K = h.num_classes
    fixed = a.method != "cross-entropy"
    if fixed and a.width:
        old = model.transform
        model.transform = TransformationLayerII(old.in_features, K, a.dim, num_blocks=2, width=a.width)
    if fixed and a.expand:
        model.transform = nn.Sequential(model.transform, Expand(a.dim, a.expand))
    if fixed and (a.align >= 0 or a.align_procrustes):
        align_frame(model, crit, h, built["datasets"]["train"], a)
    if fixed and a.frame_file:
        rows = nn.functional.normalize(torch.load(a.frame_file, weights_only=True).double(), dim=1)
        state = crit.classifier.state_dict()
        state["weight"] = rows.to(crit.classifier.weight.dtype)
        if state.get("similarity") is not None:  # K <= 4096: the cosine target is the new frame's own cosines
            state["similarity"] = (rows @ rows.T).to(crit.classifier.weight.dtype)
        crit.classifier.load_state_dict(state)
    log_s = nn.Parameter(torch.tensor(math.log(a.feat_scale)), requires_grad=a.learn_scale)
    groups = [{"params": [q for q in model.parameters() if q.requires_grad], "weight_decay": a.wd}]
    if a.learn_scale:
        groups.append({"params": [log_s], "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9)
    alpha = 0.0 if a.method == "haframe-ce" else a.alpha
    c = ops.cosine_scale_for(a.cos_scale if a.cos_scale in ops.COSINE_SCALES else float(a.cos_scale), K, a.dim)
    train, val = built["datasets"]["train"], built["datasets"]["val"]
    steps = len(train) // 64
    total, step = steps * a.epochs, 0
    gen = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        model.train()
        t0, running = time.time(), 0.0
        perm = torch.randperm(len(train), generator=gen)
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i * 64:(i + 1) * 64]
            x, y = train.inputs[idx], train.targets[idx]
            if fixed:
                f = model.transform(model.backbone(x)) * log_s.exp()
                if a.norm_scale > 0:
                    f = a.norm_scale * nn.functional.normalize(f, dim=1)
                cl = crit.classifier
                loss = ops.haframe_loss(f, cl.weight, y, alpha, similarity=cl.similarity, gram=cl.gram,
                                        cosine_scale=c)
            else:
                loss = nn.functional.cross_entropy(model(x)[1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            running += loss.item()
        model.eval()
        ev, norms = StreamingEvaluator(h, ks=(1, 5, 20)), []
        with torch.no_grad():
            for j in range(0, len(val), 1000):
                f, logits = model(val.inputs[j:j + 1000])
                norms.append(f.norm(dim=1).mean().item())
                ev.update(logits * log_s.exp(), val.targets[j:j + 1000])
        r = ev.compute()
        out = dict(name=a.name, epoch=epoch + 1, loss=round(running / steps, 4), top1=round(r["top1"], 2),
                   sev=round(r["mistake_severity"], 3), hd1=round(r["hierdist@1"], 3), hd5=round(r["hierdist@5"], 3),
                   hd20=round(r["hierdist@20"], 3), hnorm=round(sum(norms) / len(norms), 2),
                   scale=round(log_s.exp().item(), 3), sec=int(time.time() - t0))
        print(json.dumps(out), flush=True)
        with open(a.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**vars(a), **out}) + "\n")
    if a.save_classifier and not fixed:
        torch.save(model.classifier.weight.detach().clone(), a.save_classifier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
