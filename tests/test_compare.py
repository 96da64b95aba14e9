"""``haframe compare`` (haframe_ext/cli/compare.py): methods x seeds with the same trainer, reuse and resume of runs,
the summary table, compare.json / compare.md / compare.png, and its user errors; the demo built on it (demo.py)."""

import json
import shutil

import numpy as np
import pytest

import haframe_ext.cli.compare as C
from haframe_ext.cli import main
from haframe_ext.cli.compare import compare, compare_figure, parse_methods
from haframe_ext.cli.demo import DEMO_METHODS, demo
from haframe_ext.train import TrainConfig
from helpers import toy_config, write_inputs

METHODS = ["cross-entropy", "hxe"]
SEEDS = [0, 1]


def _config(folder, out, **kw) -> TrainConfig:
    return TrainConfig.from_dict({**toy_config(folder), "out": str(out), "epochs": 1, **kw})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished compare of two methods x two seeds on the toy tree (1 epoch each)."""
    tmp = tmp_path_factory.mktemp("compare")
    write_inputs(tmp)
    res = compare(_config(tmp, tmp / "cmp"), METHODS, SEEDS, verbose=False)
    return tmp, tmp / "cmp", res


@pytest.mark.parametrize("given,want", [("hxe", ["hxe"]), ("cross-entropy, hxe,", ["cross-entropy", "hxe"]),
                                        (["haframe,etf", "multi-level"], ["haframe", "etf", "multi-level"])])
def test_methods_parse_from_commas_and_lists(given, want):
    assert parse_methods(given) == want


@pytest.mark.parametrize("given,msg", [("", "empty"), ("hxe,hxe", "more than once"), ("hxe,bogus", "unknown method")])
def test_bad_methods_are_refused(given, msg):
    with pytest.raises(ValueError, match=msg):
        parse_methods(given)


def test_the_summary_is_the_mean_and_ci_of_the_runs_results(finished):
    _, out, res = finished
    assert res["finished"] and list(res["summary"]) == METHODS + [f"{m} + CRM" for m in METHODS]
    for m in METHODS:
        tests = [json.loads((out / m / f"seed{s}" / "results.json").read_text())["test"] for s in SEEDS]
        for key in ("top1", "hierdist@5", "mistake_severity"):
            x = np.array([t[key] for t in tests])
            row = res["summary"][m][key]
            assert row["n"] == 2 and row["mean"] == pytest.approx(x.mean())
            assert row["ci95"] == pytest.approx(12.7062047 * x.std(ddof=1) / np.sqrt(2), rel=1e-6)
    for col in ("top1", "mistake_severity", "hierdist@1", "hierdist@5"):
        assert col in res["metrics"]
    assert "hierdist@20" not in res["metrics"]  # the toy runs report k = 1, 2, 5 only


def test_it_writes_json_markdown_and_the_figure(finished):
    _, out, res = finished
    saved = json.loads((out / "compare.json").read_text())
    assert saved["summary"] == res["summary"] and saved["seeds"] == SEEDS and saved["methods"] == METHODS
    md = (out / "compare.md").read_text().splitlines()
    assert md[2].startswith("| method | top1 |") and sum(line.startswith("| hxe + CRM |") for line in md) == 1
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_call_reuses_every_finished_run(finished, monkeypatch):
    tmp, out, res = finished

    def no_training(cfg):
        raise AssertionError(f"retrained {cfg.out}")

    monkeypatch.setattr(C, "train", no_training)
    again = compare(_config(tmp, out, progress=True, eval_batch_size=7), METHODS, SEEDS, verbose=False, plot=False)
    assert again["summary"] == res["summary"]  # settings that do not change results are not compared


def test_a_finished_run_with_other_settings_is_refused_and_overwrite_trains_again(finished, tmp_path, monkeypatch):
    tmp, out, _ = finished
    copy = tmp_path / "cmp"
    shutil.copytree(out / "hxe", copy / "hxe")
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 there, 0.07 now\).*--overwrite"):
        compare(_config(tmp, copy, lr=0.07), ["hxe"], [0], verbose=False)
    trained = []
    monkeypatch.setattr(C, "train", lambda cfg: trained.append(cfg) or json.loads(
        (out / "hxe" / "seed0" / "results.json").read_text()))
    compare(_config(tmp, copy, lr=0.07, overwrite=True), ["hxe"], [0], verbose=False, plot=False)
    assert [c.overwrite and not c.resume for c in trained] == [True]


def test_a_killed_compare_resumes_its_unfinished_run(tmp_path):
    write_inputs(tmp_path)
    first = compare(_config(tmp_path, tmp_path / "cmp", epochs=2, stop_after_epochs=1), ["hxe"], [0, 1],
                    verbose=False)
    run = tmp_path / "cmp" / "hxe" / "seed0"
    assert first["finished"] is False and (run / "last.pt").exists() and not (run / "results.json").exists()
    done = compare(_config(tmp_path, tmp_path / "cmp", epochs=2), ["hxe"], [0, 1], verbose=False, plot=False)
    assert done["finished"] and (tmp_path / "cmp" / "compare.json").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if "epoch" in e and "val" in e] == [1, 2]
    assert any(e.get("event") == "resumed" for e in events)  # epoch 2 continued from epoch 1's checkpoint


def test_resume_from_is_refused_by_the_function_too(finished):
    tmp, out, _ = finished
    with pytest.raises(ValueError, match="drop resume_from"):
        compare(_config(tmp, out, resume_from=str(out / "hxe" / "seed0" / "last.pt")), METHODS, SEEDS, verbose=False)


def test_unknown_metrics_are_refused_naming_the_reported_ones(finished):
    tmp, out, _ = finished
    with pytest.raises(ValueError, match=r"hierdist@20 not reported.*hierdist@5"):
        compare(_config(tmp, out), METHODS, SEEDS, metrics=["top1", "hierdist@20"], verbose=False, plot=False)


@pytest.mark.parametrize("argv,msg", [(["--method", "hxe"], "use --methods"), (["--seed", "1"], "use --seeds"),
                                      (["--methods", "hxe,nope"], "unknown method 'nope'"),
                                      (["--seeds", "0", "0"], "more than once"),
                                      (["--hxe-alpha", "-2"], "hxe_alpha must be >= 0"),
                                      (["--resume-from", "x.pt"], "does not take --resume-from")])
def test_cli_mistakes_are_one_line(tmp_path, capsys, argv, msg):
    code = main(["compare", "--out", str(tmp_path / "cmp"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("haframe: error:") and msg in err


@pytest.mark.parametrize("ks", [(1, 5, 20), (1, 2)])
def test_the_figure_plots_hierdist_at_5_or_the_largest_k(tmp_path, ks):
    row = {"top1": {"mean": 50.0, "ci95": 1.0, "n": 3}, **{f"hierdist@{k}": {"mean": 1.0 + k, "ci95": 0.1, "n": 3}
                                                             for k in ks}}
    compare_figure({"a": row, "a + CRM": row, "b": row}, tmp_path / "f.png", "title")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_demo_tabulates_its_four_methods_over_seeds(tmp_path, capsys):
    assert DEMO_METHODS == ("cross-entropy", "hxe", "soft-labels", "haframe")
    means = demo(tmp_path / "demo", epochs=1, seeds=[0, 1], plot=False, n_per_class=3, eval_per_class=2, hidden=16,
                 input_dim=8)
    out = capsys.readouterr().out
    assert "test metrics on synthetic data" in out and "mean and 95% CI over seeds 0, 1" in out
    assert out.count("soft-labels + CRM") == 1 and "hxe + CRM" in out
    summary = json.loads((tmp_path / "demo" / "compare.json").read_text())["summary"]
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for m in DEMO_METHODS:
        assert saved[m]["top1"] == pytest.approx(summary[m]["top1"]["mean"]) == pytest.approx(means[m]["top1"])
        assert saved[m]["seconds"] > 0 and (tmp_path / "demo" / m / "seed1" / "results.json").exists()
