"""Tests for haframe_ext.cli and haframe_ext.cli.commands: every user mistake at the command line gives exactly
one line on stderr (``haframe: error: ...``), no traceback, exit code 2 — checked by running the
console module in child processes, the way a user does.

A fresh ``python -m haframe_ext.cli`` costs ~3 s of CPU (importing torch), too much for 66 cases on two cores,
so every case runs in a *forked* child of one "fork server" process that imported torch and the package once:
the child sets ``sys.argv``, points fd 2 at a file and runs ``haframe_ext.cli`` as ``__main__`` with
``runpy`` (exactly what ``python -m`` does), and an uncaught exception prints its traceback and exits 1, as
the interpreter would.  One case of each category also runs as a genuinely fresh ``python -m haframe_ext.cli``
(``test_console_script_in_a_fresh_process``).  Child processes run with ``HAFRAME_DISABLE_NATIVE=1`` (none of
these mistakes reaches the fused op).  Extends tests/test_cli.py, which checks a dozen such mistakes in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY_EDGES = "".join(f"{p}\t{c}\n" for p, c in [
    ("root", "A"), ("root", "B"), ("A", "A1"), ("A", "A2"), ("B", "B1"), ("B", "B2"),
    ("A1", "c0"), ("A1", "c1"), ("A2", "c2"), ("A2", "c3"), ("B1", "c4"), ("B1", "c5"), ("B2", "c6"), ("B2", "c7")])
TRAIN = ["train", "--hierarchy", "toy.tsv", "--epochs", "1", "--no-progress", "--no-tensorboard", "--out", "run"]


def _feats(folder: Path, train=None, test=None):
    folder.mkdir()
    tr = train if train is not None else {"features": torch.randn(16, 3), "labels": torch.arange(16) % 8}
    te = test if test is not None else {"features": torch.randn(8, 3), "labels": torch.arange(8)}
    for name, obj in (("train.pt", tr), ("test.pt", te)):
        if isinstance(obj, bytes):
            (folder / name).write_bytes(obj)
        else:
            torch.save(obj, folder / name)


def make_inputs(d: Path) -> None:
    """Every file the cases refer to, relative to the folder the CLI runs in."""
    (d / "toy.tsv").write_text(TOY_EDGES)
    (d / "garbage.tsv").write_bytes(b"\xff\xfe\x00\x01 binary garbage")
    (d / "cycle.tsv").write_text("root\tx\na\tb\nb\tc\nc\ta\n")
    (d / "three_fields.tsv").write_text("root\ta\tb\n")
    (d / "empty.tsv").write_text("")
    (d / "classes_unknown.txt").write_text("\n".join(["c0", "c1", "c2", "c3", "c4", "c5", "c6", "zz"]) + "\n")
    (d / "asym.csv").write_text("0,1\n2,0\n")
    (d / "d.txt").write_text("0,1\n1,0\n")
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "d2.npy", np.array([[0, 1], [1, 0]]))
    (d / "bad.json").write_text("{not json")
    (d / "deep.json").write_text('{"a": ' * 5000 + "1" + "}" * 5000)
    (d / "latin1.json").write_bytes(b'{"out": "caf\xe9"}')
    (d / "list.json").write_text("[1, 2]")
    (d / "unknown_field.json").write_text('{"epochz": 3}')
    (d / "a_file").write_text("not a folder")
    (d / "text.pt").write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, d / "foreign.pt")
    _feats(d / "feat_labels_too_big", train={"features": torch.randn(16, 3), "labels": torch.arange(16) % 12})
    _feats(d / "feat_test_labels_too_big", test={"features": torch.randn(8, 3), "labels": torch.arange(8) + 4})
    _feats(d / "feat_row_mismatch", train={"features": torch.randn(16, 3), "labels": torch.arange(10) % 8})
    x = torch.randn(16, 3)
    x[3, 1] = float("nan")
    _feats(d / "feat_nan", train={"features": x, "labels": torch.arange(16) % 8})
    _feats(d / "feat_dims", test={"features": torch.randn(8, 5), "labels": torch.arange(8)})
    _feats(d / "feat_random_bytes", train=np.random.default_rng(0).bytes(300))
    _feats(d / "feat_text", train=b"hello")
    _feats(d / "feat_float_labels", train={"features": torch.randn(16, 3), "labels": torch.rand(16)})
    (d / "feat_no_train").mkdir()
    torch.save({"features": torch.randn(8, 3), "labels": torch.arange(8)}, d / "feat_no_train" / "test.pt")
    (d / "cifar_empty").mkdir()
    (d / "cifar_garbage").mkdir()
    for name in ("meta", "train", "test"):
        (d / "cifar_garbage" / name).write_bytes(b"\x00\x01 not a pickle")
    (d / "images" / "train" / "zz").mkdir(parents=True)
    (d / "images" / "train" / "zz" / "x.png").write_bytes(b"")
    (d / "images" / "test").mkdir()
    # round 3 (issue 22)
    (d / "dup.json").write_text('{"epochs": 2, "lr": 0.1, "epochs": 3}')
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'{"epochs": 0}')
    (d / "zero_pair.csv").write_text("0,0,1\n0,0,1\n1,1,0\n")
    (d / "no_triangle.csv").write_text("0,6,5,3\n6,0,1,1\n5,1,0,9\n3,1,9,0\n")
    _feats(d / "feat_empty_test", test={"features": torch.randn(0, 3), "labels": torch.zeros(0, dtype=torch.long)})
    # round 2: config fields of the wrong type (issue 14 item 1)
    for name, field in CONFIG_TYPE_CASES.items():
        (d / f"cfg_{name}.json").write_text(field)


# (id, argv, fragments the single stderr line must contain)
CASES = [
    # missing files
    ("missing-hierarchy-file", ["train", "--hierarchy", "nope/tree.tsv", "--out", "run"],
     ["nope/tree.tsv", "not a builtin name", "an existing file"]),
    ("missing-classes-file", TRAIN + ["--classes", "nope.txt"], ["No such file or directory", "nope.txt"]),
    ("missing-distances-file", TRAIN + ["--distances", "nope.npy"], ["distance matrix file not found: nope.npy"]),
    ("missing-config-file", ["train", "--config", "nope.json"], ["config file not found: nope.json"]),
    ("missing-data-root", TRAIN + ["--dataset", "features", "--data-root", "nope"], ["data root not found: nope"]),
    ("no-data-root", TRAIN + ["--dataset", "features"], ["needs a data root (--data-root)"]),
    ("missing-train-features", TRAIN + ["--dataset", "features", "--data-root", "feat_no_train"],
     ["expected a folder with train and test feature files"]),
    ("missing-cifar-files", ["train", "--hierarchy", "cifar100", "--dataset", "cifar100", "--data-root",
                             "cifar_empty", "--epochs", "1", "--out", "run"], ["CIFAR-100 file not found", "meta"]),
    ("missing-resume-checkpoint", TRAIN + ["--resume-from", "nope.pt"], ["checkpoint not found: nope.pt"]),
    ("missing-eval-checkpoint", ["eval", "--checkpoint", "nope.pt"], ["checkpoint not found: nope.pt"]),
    ("eval-checkpoint-is-a-folder", ["eval", "--checkpoint", "images"], ["checkpoint not found: images"]),
    ("missing-frame-distances", ["frame", "--distances", "nope.npy"], ["not found"]),
    ("missing-frame-classes", ["frame", "--hierarchy", "toy.tsv", "--classes", "nope.txt"], ["classes file not found"]),
    ("frame-out-folder-missing", ["frame", "--hierarchy", "toy.tsv", "--out", "nope/f.pt"],
     ["output folder does not exist: nope"]),
    ("out-below-a-file", TRAIN[:-1] + ["a_file/run"], ["Not a directory"]),
    ("out-is-a-file", TRAIN[:-1] + ["a_file"], ["a_file"]),
    # wrong format
    ("hierarchy-binary-garbage", TRAIN[:2] + ["garbage.tsv"] + TRAIN[3:], ["garbage.tsv", "not UTF-8"]),
    ("hierarchy-cycle", TRAIN[:2] + ["cycle.tsv"] + TRAIN[3:], ["cycle in the hierarchy"]),
    ("hierarchy-three-fields", TRAIN[:2] + ["three_fields.tsv"] + TRAIN[3:], ["line 1: malformed line"]),
    ("hierarchy-empty-file", TRAIN[:2] + ["empty.tsv"] + TRAIN[3:], ["the hierarchy is empty"]),
    ("classes-unknown-name", TRAIN + ["--classes", "classes_unknown.txt"], ["line 8: unknown class 'zz'"]),
    ("distances-asymmetric", TRAIN + ["--distances", "asym.csv"], ["not symmetric"]),
    ("distances-extension", ["frame", "--distances", "d.txt"], ["unknown extension '.txt'"]),
    ("distances-pickled-npy", ["frame", "--distances", "obj.npy"], ["cannot load without pickle"]),
    ("config-not-json", ["train", "--config", "bad.json"], ["bad.json: not valid JSON"]),
    ("config-json-list", ["train", "--config", "list.json"], ["expected a JSON object"]),
    ("config-deeply-nested", ["train", "--config", "deep.json"], ["deep.json: nested too deeply"]),
    ("config-not-utf8", ["train", "--config", "latin1.json"], ["latin1.json: not UTF-8 text"]),
    ("config-unknown-field", ["train", "--config", "unknown_field.json"], ["unknown TrainConfig field(s): epochz"]),
    ("features-random-bytes", TRAIN + ["--dataset", "features", "--data-root", "feat_random_bytes"],
     ["train.pt: not a readable features file"]),
    ("features-text-file", TRAIN + ["--dataset", "features", "--data-root", "feat_text"], ["train.pt"]),
    ("features-nan", TRAIN + ["--dataset", "features", "--data-root", "feat_nan"], ["features contain NaN or Inf"]),
    ("features-dims-differ", TRAIN + ["--dataset", "features", "--data-root", "feat_dims"], ["different dimensions"]),
    ("features-rows-vs-labels", TRAIN + ["--dataset", "features", "--data-root", "feat_row_mismatch"],
     ["16 feature rows but 10 labels"]),
    ("features-float-labels", TRAIN + ["--dataset", "features", "--data-root", "feat_float_labels"],
     ["labels must be integer class indices"]),
    ("cifar-garbage-files", ["train", "--hierarchy", "cifar100", "--dataset", "cifar100", "--data-root",
                             "cifar_garbage", "--epochs", "1", "--out", "run"], ["not a valid CIFAR-100 file"]),
    ("eval-text-checkpoint", ["eval", "--checkpoint", "text.pt"], ["text.pt is corrupted or truncated"]),
    ("eval-foreign-checkpoint", ["eval", "--checkpoint", "foreign.pt"], ["not a haframe_ext checkpoint"]),
    # unknown names
    ("unknown-dataset", TRAIN + ["--dataset", "mnist"], ["unknown dataset 'mnist'", "synthetic"]),
    ("unknown-method", TRAIN + ["--method", "softmax"], ["unknown method 'softmax'", "haframe"]),
    ("unknown-hierarchy", ["train", "--hierarchy", "imagenet", "--out", "run"], ["'imagenet'", "cifar100"]),
    ("unknown-frame-hierarchy", ["frame", "--hierarchy", "imagenet"], ["'imagenet'", "not a builtin name"]),
    ("unknown-demo-method", ["demo", "--methods", "softmax", "--out", "demo"], ["unknown method 'softmax'"]),
    ("unknown-alpha-schedule", TRAIN + ["--alpha-schedule", "zigzag"], ["unknown alpha schedule 'zigzag'"]),
    ("unknown-subcommand", ["fit"], ["invalid choice: 'fit'"]),
    ("unknown-flag", TRAIN + ["--learning-rate", "0.1"], ["unrecognized arguments: --learning-rate"]),
    ("unknown-split", ["eval", "--checkpoint", "text.pt", "--split", "dev"], ["invalid choice: 'dev'"]),
    ("image-backbone-for-vectors", TRAIN + ["--backbone", "wrn28"], ["use the 'mlp' backbone"]),
    ("cuda-on-a-cpu-machine", TRAIN + ["--device", "cuda"], ["CUDA is not available"]),
    # label count not matching the hierarchy
    ("labels-beyond-hierarchy", TRAIN + ["--dataset", "features", "--data-root", "feat_labels_too_big"],
     ["labels range over [0, 11] but the hierarchy has 8 classes"]),
    ("test-labels-beyond-hierarchy", TRAIN + ["--dataset", "features", "--data-root", "feat_test_labels_too_big"],
     ["test.pt", "hierarchy has 8 classes"]),
    ("cifar-with-8-class-hierarchy", TRAIN + ["--dataset", "cifar100", "--data-root", "cifar_empty"],
     ["CIFAR-100 has 100 classes but the hierarchy has 8"]),
    ("distances-for-2-classes", TRAIN + ["--distances", "d2.npy"],
     ["distance matrix is (2, 2) but the hierarchy has 8"]),
    ("image-folder-unknown-class", TRAIN + ["--dataset", "imagefolder", "--data-root", "images"],
     ["class folder(s) not in the hierarchy", "zz"]),
    # bad values
    ("epochs-not-int", TRAIN + ["--epochs", "abc"], ["argument --epochs: invalid int value: 'abc'"]),
    ("epochs-zero", TRAIN + ["--epochs", "0"], ["epochs must be >= 1"]),
    ("flag-without-value", ["train", "--epochs"], ["argument --epochs: expected one argument"]),
    ("batch-size-one", TRAIN + ["--batch-size", "1"], ["batch_size must be >= 2"]),
    ("alpha-above-one", TRAIN + ["--alpha", "1.5"], ["alpha must be in [0, 1]"]),
    ("negative-lr", TRAIN + ["--lr", "-0.1"], ["lr must be > 0"]),
    ("gamma-nan", ["frame", "--hierarchy", "toy.tsv", "--gamma", "nan"], ["gamma must be a finite number > 0"]),
    ("s-min-word", TRAIN + ["--s-min", "tight"], ["must be 'exact', 'grid' or a number"]),
    ("s-min-inadmissible", TRAIN + ["--s-min", "-5"], ["s_min=-5.0", "most negative admissible value", "-0.476547"]),
    ("etf-one-class", ["frame", "--etf", "1"], ["--etf needs K >= 2"]),
]

# issue 14 item 1: one JSON config field of the wrong type or range each; the error names the field and its flag
CONFIG_TYPE_CASES = {
    "overwrite-string": '{"overwrite": "false"}', "resume-string": '{"resume": "no"}',
    "epochs-string": '{"epochs": "3"}', "epochs-fraction": '{"epochs": 1.5}', "alpha-string": '{"alpha": "0.4"}',
    "lr-null": '{"lr": null}', "hierarchy-null": '{"hierarchy": null}', "lr-json-nan": '{"lr": NaN}',
    "eval-ks-string": '{"eval_ks": "1,5"}', "seed-bool": '{"seed": true}', "out-empty": '{"out": ""}',
    "backbone-empty": '{"backbone": ""}', "classes-empty": '{"classes": ""}',
    "resume-from-empty": '{"resume_from": ""}',
    "stop-after-zero": '{"stop_after_epochs": 0}', "feature-dim-zero": '{"feature_dim": 0}',
}
CONFIG_TYPE_FRAGMENTS = {
    "overwrite-string": ["overwrite must be true or false", "'false' (a string)", "--overwrite"],
    "resume-string": ["resume must be true or false", "--resume"], "epochs-string": ["epochs must be an integer"],
    "epochs-fraction": ["epochs must be an integer, got 1.5"], "alpha-string": ["alpha must be a number", "--alpha"],
    "lr-null": ["lr must be a number, got null", "--lr"], "hierarchy-null": ["hierarchy must be a non-empty string"],
    "lr-json-nan": ["lr must be a finite number, got nan"], "eval-ks-string": ["eval_ks must be a non-empty list"],
    "seed-bool": ["seed must be an integer, got true"], "out-empty": ["out must be a non-empty string", "--out"],
    "backbone-empty": ["backbone must be a non-empty string"], "classes-empty": ["classes must be a non-empty"],
    "resume-from-empty": ["resume_from must be a non-empty string", "--resume-from"],
    "stop-after-zero": ["stop_after_epochs must be >= 1"], "feature-dim-zero": ["feature_dim must be >= 1"],
}
# (no other flags: a flag would override the field under test)
CASES += [(f"config-{name}", ["train", "--config", f"cfg_{name}.json"], CONFIG_TYPE_FRAGMENTS[name])
          for name in CONFIG_TYPE_CASES]
# issue 14 items 7, 11, 12, 14, 18: NaN/inf and out-of-range flags, devices, sizes, paths; each names its flag
CASES += [
    ("lr-nan", TRAIN + ["--lr", "nan"], ["lr must be a finite number, got nan (--lr)"]),
    ("lr-inf", TRAIN + ["--lr", "inf"], ["lr must be a finite number, got inf (--lr)"]),
    ("momentum-nan", TRAIN + ["--momentum", "nan"], ["momentum must be a finite number", "--momentum"]),
    ("momentum-above-one", TRAIN + ["--momentum", "1.5"], ["momentum must be in [0, 1]"]),
    ("weight-decay-nan", TRAIN + ["--weight-decay", "nan"], ["weight_decay must be a finite number"]),
    ("weight-decay-negative", TRAIN + ["--weight-decay", "-1"], ["weight_decay must be >= 0"]),
    ("backbone-lr-scale-nan", TRAIN + ["--backbone-lr-scale", "nan"], ["backbone_lr_scale must be a finite"]),
    ("backbone-lr-scale-inf", TRAIN + ["--backbone-lr-scale", "inf"], ["--backbone-lr-scale"]),
    ("min-lr-nan", TRAIN + ["--min-lr", "nan"], ["min_lr must be a finite number", "--min-lr"]),
    ("min-lr-above-lr", TRAIN + ["--min-lr", "1"], ["min_lr (1.0) must not exceed lr (0.1)"]),
    ("grad-clip-nan", TRAIN + ["--grad-clip", "nan"], ["grad_clip must be a finite number", "--grad-clip"]),
    ("difficulty-nan", TRAIN + ["--difficulty", "nan"], ["difficulty must be a finite number", "--difficulty"]),
    ("gamma-inf-train", TRAIN + ["--gamma", "inf"], ["gamma must be a finite number", "--gamma"]),
    ("dist-timeout-nan", TRAIN + ["--dist-timeout", "nan"], ["dist_timeout must be a finite number"]),
    ("warmup-epochs-nan", TRAIN + ["--warmup-epochs", "nan"], ["warmup_epochs must be a finite", "--warmup-epochs"]),
    ("warmup-epochs-inf", TRAIN + ["--warmup-epochs", "inf"], ["warmup_epochs must be a finite", "--warmup-epochs"]),
    ("seed-negative", TRAIN + ["--seed", "-1"], ["seed must be in [0, 2**63), got -1 (--seed)"]),
    ("alpha-period-nan", TRAIN + ["--alpha-schedule", "cosine", "--alpha-period", "nan"],
     ["alpha_period must be a finite number", "--alpha-period"]),
    ("alpha-period-zero", TRAIN + ["--alpha-schedule", "cosine", "--alpha-period", "0"], ["alpha_period must be > 0"]),
    ("eval-per-class-zero", TRAIN + ["--eval-per-class", "0"], ["eval_per_class must be >= 1", "--eval-per-class"]),
    ("n-per-class-zero", TRAIN + ["--n-per-class", "0"], ["n_per_class must be >= 1"]),
    ("hidden-zero", TRAIN + ["--hidden", "0"], ["hidden must be >= 1"]),
    ("train-eval-batch-size-zero", TRAIN + ["--eval-batch-size", "0"], ["eval_batch_size must be >= 1"]),
    ("out-empty", TRAIN[:-1] + [""], ["out must be a non-empty string", "--out"]),
    ("out-too-long", TRAIN[:-1] + ["x" * 300],
     ["File name too long", "...' (", "characters)", "choose a shorter path"]),
    ("distances-empty", TRAIN + ["--distances", ""], ["distances must be a non-empty string"]),
    ("select-metric-unknown", TRAIN + ["--select-metric", "f1"], ["select_metric 'f1'", "hierdist@1"]),
    ("device-foo", TRAIN + ["--device", "foo"], ["device must be auto, cpu, cuda or cuda:N, got 'foo'"]),
    ("device-meta", TRAIN + ["--device", "meta"], ["got 'meta' (--device)"]),
    ("device-mps", TRAIN + ["--device", "mps"], ["got 'mps' (--device)"]),
    ("seeds-repeated", TRAIN + ["--seeds", "0", "0"], ["seed(s) 0 listed more than once (--seeds)"]),
    ("seeds-negative", TRAIN + ["--seeds", "-1"], ["argument --seeds: must be an integer >= 0"]),
    ("frame-etf-200000", ["frame", "--etf", "200000"], ["200000"]),  # the frame's size rule, or out of memory
    ("frame-dim-1e9", ["frame", "--hierarchy", "toy.tsv", "--dim", "1000000000"],
     ["a frame of K=8 classes in dim=1000000000 needs about", "GiB is available", "choose dim <="]),
    ("frame-out-existing-folder", ["frame", "--hierarchy", "toy.tsv", "--out", "images"],
     ["--out 'images' is a folder"]),
    ("frame-out-proc-version", ["frame", "--hierarchy", "toy.tsv", "--out", "/proc/version"],
     ["cannot write --out '/proc/version'"]),
    ("frame-out-empty", ["frame", "--hierarchy", "toy.tsv", "--out", ""], ["argument --out: must be a non-empty"]),
    ("frame-plot-folder", ["frame", "--hierarchy", "toy.tsv", "--plot", "images"], ["--plot 'images' is a folder"]),
    ("frame-dim-zero", ["frame", "--hierarchy", "toy.tsv", "--dim", "0"], ["argument --dim: must be an integer >= 1"]),
    ("frame-seed-negative", ["frame", "--seed", "-1"], ["argument --seed: must be an integer >= 0"]),
    ("bench-batch-negative", ["bench", "--batch", "-1"], ["argument --batch: must be an integer >= 1, got -1"]),
    ("bench-threads-negative", ["bench", "--threads", "-1"], ["argument --threads: must be an integer >= 1"]),
    ("bench-threads-zero", ["bench", "--threads", "0"], ["argument --threads: must be an integer >= 1"]),
    ("bench-min-run-time-nan", ["bench", "--min-run-time", "nan"], ["argument --min-run-time: must be a finite"]),
    ("bench-min-run-time-inf", ["bench", "--min-run-time", "inf"], ["argument --min-run-time: must be a finite"]),
    ("bench-repeats-zero", ["bench", "--repeats", "0"], ["argument --repeats: must be an integer >= 1"]),
    ("bench-classes-one", ["bench", "--classes", "1"], ["argument --classes: must be an integer >= 2"]),
    ("bench-device-foo", ["bench", "--device", "foo"], ["--device must be auto, cpu, cuda or cuda:N"]),
    ("eval-device-meta", ["eval", "--checkpoint", "text.pt", "--device", "meta"], ["--device must be auto"]),
    ("eval-batch-size-zero", ["eval", "--checkpoint", "text.pt", "--batch-size", "0"], ["--batch-size"]),
    ("eval-json-empty", ["eval", "--checkpoint", "text.pt", "--json", ""], ["argument --json: must be a non-empty"]),
    ("demo-epochs-zero", ["demo", "--epochs", "0"], ["argument --epochs: must be an integer >= 1"]),
    ("demo-out-empty", ["demo", "--out", ""], ["argument --out: must be a non-empty path"]),
    ("hierarchy-out-empty", ["hierarchy", "toy.tsv", "--out", ""], ["argument --out: must be a non-empty path"]),
    ("hierarchy-out-folder", ["hierarchy", "toy.tsv", "--out", "images"], ["images"]),
    ("hierarchy-out-proc-version", ["hierarchy", "toy.tsv", "--out", "/proc/version"], ["/proc/version"]),
    ("hierarchy-gamma-nan", ["hierarchy", "toy.tsv", "--gamma", "nan"], ["argument --gamma: must be a finite"]),
]

# issue 22: inputs a frame or a run would ignore (item 7), duplicate JSON keys and a BOM (items 9, 19), frames whose
# classes cannot be told apart (item 12), sizes beyond what the machine holds or than overflow later (items 15, 17, 19)
BIG = "1" + "0" * 20  # 10^20
CASES += [
    ("frame-etf-with-hierarchy-gamma-s-min", ["frame", "--etf", "5", "--hierarchy", "cifar100", "--s-min", "0.5",
                                              "--gamma", "nan"],
     ["--etf builds a simplex ETF", "drop --hierarchy, --gamma, --s-min"]),
    ("frame-distances-with-classes", ["frame", "--distances", "d2.npy", "--classes", "classes_unknown.txt"],
     ["--distances gives the class distances as a matrix", "drop --classes"]),
    ("frame-hierarchy-with-distances", ["frame", "--hierarchy", "toy.tsv", "--distances", "d2.npy"],
     ["drop --hierarchy"]),
    ("frame-matrix-hierarchy-with-convention", ["frame", "--hierarchy", "asym.csv", "--distance-convention", "height"],
     ["is a distance matrix", "drop --distance-convention"]),
    ("frame-classes-with-builtin", ["frame", "--hierarchy", "cifar100", "--classes", "classes_unknown.txt"],
     ["'cifar100' has its own order", "drop --classes"]),
    ("train-classes-with-random", TRAIN[:2] + ["random:8"] + TRAIN[3:] + ["--classes", "classes_unknown.txt"],
     ["'random:8' has its own order", "drop --classes"]),
    ("train-data-root-with-synthetic", TRAIN + ["--data-root", "images"], ["data_root is not read by the synthetic"]),
    ("config-duplicate-key", ["train", "--config", "dup.json"], ["dup.json: the key 'epochs' appears twice"]),
    ("config-with-bom", ["train", "--config", "bom.json"], ["epochs must be >= 1, got 0"]),  # read, then checked
    ("frame-gamma-1e-300", ["frame", "--hierarchy", "toy.tsv", "--gamma", "1e-300"],
     ["gamma=1e-300 is so small that exp(-gamma d / d_max) rounds to 1"]),
    ("frame-two-classes-at-distance-0", ["frame", "--distances", "zero_pair.csv"],
     ["classes 0 and 1, at distance 0", "cannot be told apart"]),
    ("frame-distances-break-triangle", ["frame", "--distances", "no_triangle.csv"],
     ["s_min=1", "cannot be told apart", "triangle inequality"]),
    ("hidden-1e20", TRAIN + ["--hidden", BIG], ["hidden must be <= 2147483647", "--hidden"]),
    ("hidden-beyond-memory", TRAIN + ["--hidden", "10000000"], ["the model (", "GiB is available", "--hidden"]),
    ("n-per-class-1e20", TRAIN + ["--n-per-class", BIG], ["n_per_class must be <= 2147483647"]),
    ("n-per-class-beyond-memory", TRAIN + ["--n-per-class", "2000000000"],
     ["the synthetic data (", "GiB is available", "--n-per-class"]),
    ("eval-per-class-1e20", TRAIN + ["--eval-per-class", BIG], ["eval_per_class must be <= 2147483647"]),
    ("input-dim-1e20", TRAIN + ["--input-dim", BIG], ["input_dim must be <= 2147483647"]),
    ("num-workers-1e20", TRAIN + ["--num-workers", BIG], ["num_workers must be <= 2147483647"]),
    ("num-workers-beyond-cpus", TRAIN + ["--num-workers", "100000"], ["num_workers must be <= ", "per CPU"]),
    ("num-blocks-1e20", TRAIN + ["--num-blocks", BIG], ["num_blocks must be <= 2147483647"]),
    ("num-blocks-beyond-memory", TRAIN + ["--num-blocks", "2000000000"], ["the model (", "--num-blocks"]),
    ("depth-1e20", TRAIN + ["--depth", BIG], ["depth must be <= 2147483647"]),
    ("lr-1e39", TRAIN + ["--lr", "1e39"], ["lr must be <= 3.4e+38 (the largest float32)"]),
    ("weight-decay-1e39", TRAIN + ["--weight-decay", "1e39"], ["weight_decay must be <= 3.4e+38"]),
    ("frame-random-1e20", ["frame", "--hierarchy", "random:" + BIG], ["a random hierarchy of K=", "classes fit"]),
    ("bench-batch-1e20", ["bench", "--batch", BIG], ["argument --batch: must be an integer <= 2147483647"]),
    ("bench-threads-1e20", ["bench", "--threads", BIG], ["argument --threads: must be an integer <= 2147483647"]),
    ("eval-batch-size-1e20", ["eval", "--checkpoint", "text.pt", "--batch-size", BIG],
     ["argument --batch-size: must be an integer <= 2147483647"]),
    ("device-non-ascii-digit", TRAIN + ["--device", "cuda:\u0661"], ["device must be auto, cpu, cuda or cuda:N"]),
    ("train-empty-test-split", TRAIN + ["--dataset", "features", "--data-root", "feat_empty_test"],
     ["the test split has no samples"]),
]

XFAIL = {}  # case id -> reason, for a strict xfail while a bug is open (bugs 10 and 11 are fixed)


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import torch._inductor, tqdm.auto, scipy.linalg  # imported lazily by the trainer: pay for them once, here
import haframe_ext, haframe_ext.train, haframe_ext.training.data, haframe_ext.training.models  # the expensive imports
cases, folder = json.load(open(sys.argv[1])), sys.argv[2]
codes = {}
for cid, argv in cases:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.path.join(folder, cid + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["haframe", *argv]
        code = 0
        try:
            runpy.run_module("haframe_ext.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes[cid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
json.dump(codes, open(os.path.join(folder, "codes.json"), "w"))
"""


def _env():
    return dict(os.environ, HAFRAME_DISABLE_NATIVE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    make_inputs(base)
    return base


@pytest.fixture(scope="module")
def results(workdir, tmp_path_factory):
    """Run every case in a forked child of one fork server; id -> (exit code, stderr)."""
    errs = tmp_path_factory.mktemp("cli_stderr")
    (errs / "cases.json").write_text(json.dumps([[cid, argv] for cid, argv, _ in CASES]))
    p = subprocess.run([sys.executable, "-c", FORK_SERVER, str(errs / "cases.json"), str(errs)], capture_output=True,
                       text=True, env=_env(), timeout=300, cwd=str(workdir))
    assert p.returncode == 0, p.stderr[-3000:]
    codes = json.loads((errs / "codes.json").read_text())
    return {cid: (codes[cid], (errs / f"{cid}.err").read_text()) for cid, _, _ in CASES}


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[case[0]])] if case[0] in XFAIL else []
    return pytest.param(case, id=case[0], marks=marks)


def check_one_line(rc, err, fragments):
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("haframe: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert rc == 2, (rc, lines[0])


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_user_mistake_is_one_line_and_exit_code_2(results, case):
    cid, _, fragments = case
    check_one_line(*results[cid], fragments)


# one case per category (missing file, wrong format, unknown name, label count) as a genuinely fresh process
FRESH = ["missing-hierarchy-file", "hierarchy-binary-garbage", "unknown-dataset", "labels-beyond-hierarchy"]


@pytest.fixture(scope="module")
def fresh_results(workdir):
    by_id = {c[0]: c for c in CASES}

    def run(cid):
        p = subprocess.run([sys.executable, "-m", "haframe_ext.cli", *by_id[cid][1]], capture_output=True, text=True,
                           env=_env(), timeout=120, cwd=str(workdir))
        return cid, (p.returncode, p.stderr)

    # one at a time: the train cases share --out run, and a run claims its folder before checking its inputs
    return dict(map(run, FRESH))


@pytest.mark.parametrize("cid", FRESH)
def test_console_script_in_a_fresh_process(fresh_results, cid):
    fragments = next(c[2] for c in CASES if c[0] == cid)
    check_one_line(*fresh_results[cid], fragments)


def test_no_case_leaves_a_run_behind(results, fresh_results, workdir):
    """Every mistake is caught before training: no checkpoint or results file appears."""
    written = [p for p in workdir.rglob("*") if p.name in ("last.pt", "prev.pt", "best.pt", "results.json")]
    assert not written, written


def test_hierarchy_accepts_random_k_as_train_and_frame_do(capsys):
    """Issue 22 item 19: ``haframe hierarchy random:8`` was refused while train and frame accept random:K."""
    from haframe_ext.cli import main

    assert main(["hierarchy", "random:8"]) == 0
    assert "8" in capsys.readouterr().out


@pytest.mark.parametrize("after", [0.3, 1.2, 2.5])
def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(tmp_path, after):
    """Issue 22 item 18: SIGINT while torch imports (the first seconds of any command) gave a 20-90 line traceback,
    a RecursionError or "cannot import name '_inductor'" with exit 2; it is "haframe: interrupted", exit 130."""
    import signal
    import time

    (tmp_path / "toy.tsv").write_text(TOY_EDGES)
    p = subprocess.Popen([sys.executable, "-m", "haframe_ext.cli", *TRAIN], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(tmp_path))
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "haframe: interrupted", (p.returncode, err[-2000:])
