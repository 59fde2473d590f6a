"""`peftflow sweep` (a grid on DVC's experiment queue) and `peftflow compare` (mean ± spread per point)."""

import json
import statistics
import subprocess
import sys

import pytest
from conftest import copy_repo, sh
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.stage import PipelineError
from pipeline.sweep import grid_args, group


def test_a_grid_with_two_seeds_runs_through_the_queue_and_is_compared(history, tmp_path):
    # every stage reproduced already: the queued experiments take the stages before train from DVC's run cache
    repo = copy_repo(history["root"], tmp_path / "repo")
    r = CliRunner().invoke(app, ["sweep", "--root", str(repo), "-n", "g", "-S", "train.lr=0.02,0.005",
                                 "-S", "train.lora.r=8", "-S", "evaluate.shots=0", "-S", "evaluate.samples=0",
                                 "--seeds", "1,2", "-j", "2"])
    assert r.exit_code == 0, r.output
    assert "4 experiments queued" in r.output and "4 success" in r.output
    shown = json.loads(sh(repo, sys.executable, "-m", "dvc", "exp", "show", "--json", "--all-commits"))
    exps = {e["name"]: e["revs"][0]["data"] for c in shown for e in c.get("experiments") or []}
    assert sorted(exps) == [f"g-{k}" for k in range(1, 5)]
    points = {(d["params"]["params.yaml"]["data"]["train"]["lr"], d["params"]["params.yaml"]["data"]["train"]["lora"]["r"],
               d["params"]["params.yaml"]["data"]["seed"]) for d in exps.values()}
    assert points == {(lr, 8, seed) for lr in (0.02, 0.005) for seed in (1, 2)}

    r = CliRunner().invoke(app, ["compare", "--root", str(repo), "-n", "g", "--out", str(repo / "docs" / "g")])
    assert r.exit_code == 0, r.output
    md = (repo / "docs" / "g.md").read_text()
    assert (repo / "docs" / "g.png").stat().st_size > 5000
    rows = [line for line in md.splitlines() if line.startswith("| ") and "train.lr=" in line]
    assert len(rows) == 2
    # the table's first point is the best mean over its two seeds, computed here from `dvc exp show`
    acc: dict[tuple, list] = {}
    for d in exps.values():
        p = d["params"]["params.yaml"]["data"]
        acc.setdefault((p["train"]["lr"], p["train"]["lora"]["r"]), []).append(
            d["metrics"]["reports/evaluate/metrics.json"]["data"]["adapter"]["accuracy"])
    best = max(acc, key=lambda k: statistics.fmean(acc[k]))
    assert f"train.lr={best[0]}" in rows[0]
    assert f"{statistics.fmean(acc[best]):.4f} ± {statistics.stdev(acc[best]):.4f}" in rows[0]
    # a second sweep under the same name is refused before anything is queued
    r = CliRunner().invoke(app, ["sweep", "--root", str(repo), "-n", "g", "-S", "train.lr=0.01"])
    assert r.exit_code == 2 and "exist already" in r.output


def test_paths_outside_the_project_go_absolute_and_untracked_files_are_refused(repo, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((repo / "data" / "example" / "sentiment_train.jsonl").read_text())
    args = grid_args(["data.train=../elsewhere.jsonl", "train.lr=0.1,0.2"], [1, 2], repo)
    assert args == ["-S", f"data.train={outside}", "-S", "train.lr=0.1,0.2",
                    "-S", "data.validation=data/example/sentiment_validation.jsonl",
                    "-S", "format.template=prompts/sentiment.jinja", "-S", "seed=1,2"]
    (repo / "prompts" / "new.jinja").write_text((repo / "prompts" / "sentiment.jinja").read_text())
    with pytest.raises(PipelineError, match="prompts/new.jinja is not tracked by git"):
        grid_args(["format.template=prompts/new.jinja"], [1], repo)
    with pytest.raises(PipelineError, match="use --seeds"):
        grid_args(["seed=1,2"], [1], repo)
    with pytest.raises(PipelineError, match="no such file"):
        grid_args(["data.train=data/nope.jsonl"], [1], repo)
    subprocess.run(["git", "add", "prompts/new.jinja"], cwd=repo, check=True)
    assert "format.template=prompts/new.jinja" in grid_args(["format.template=prompts/new.jinja"], [1], repo)


def test_group_gives_mean_and_spread_per_point_best_first():
    def exp(name, lr, seed, value, seconds):
        return {"name": name, "params": {"seed": seed, "train": None, "train.lr": lr, "task": "x"},
                "metrics": {"accuracy": value, "eval_loss": 1 - value}, "seconds": seconds, "steps": 10}

    exps = [exp("a", 0.1, 1, 0.8, 60), exp("b", 0.1, 2, 0.9, 80), exp("c", 0.2, 1, 0.95, 100),
            exp("d", 0.2, 2, 0.7, 100), exp("e", 0.3, 1, 0.84, 30)]
    groups = group(exps, "accuracy")
    assert [g["point"] for g in groups] == [{"train.lr": 0.1}, {"train.lr": 0.3}, {"train.lr": 0.2}]
    assert groups[0]["metric"]["mean"] == pytest.approx(0.85)
    assert groups[0]["metric"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert groups[0]["seconds"]["mean"] == 70 and groups[0]["seeds"] == [1, 2] and groups[0]["experiments"] == ["a", "b"]
    assert groups[1]["metric"]["n"] == 1 and groups[1]["metric"]["std"] == 0.0
    # lower is better for a loss: the same data, best first the other way
    assert [g["point"]["train.lr"] for g in group(exps, "eval_loss")] == [0.1, 0.3, 0.2]
