"""Pull-request report and lineage across commits, in a temporary git + DVC repo on the tiny model."""

import json
import re
import subprocess
import sys

from conftest import copy_repo, sh


def cli(repo, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=repo, capture_output=True, text=True,
                          env={**__import__("os").environ, "COLUMNS": "250"})


def test_report_and_lineage_across_two_commits(history, tmp_path):
    repo = copy_repo(history["root"], tmp_path / "repo")  # lr 2e-2 reproduced and committed, then lr 1e-3
    first, second = history["first"], history["second"]
    before = json.loads(sh(repo, "git", "show", f"{first}:reports/train/metrics.json"))
    after = json.loads((repo / "reports" / "train" / "metrics.json").read_text())
    assert before["final_loss"] != after["final_loss"]

    r = cli(repo, "report", "--base", first, "--out", "pr")
    assert r.returncode == 0, r.stderr
    md = (repo / "pr" / "report.md").read_text()
    assert "| train.lr | 0.02 | 0.001 |" in md
    row = re.search(r"\| reports/train/metrics.json:final_loss \| (\S+) \| (\S+) \| (\S+) \|", md)
    assert row and abs(float(row[1]) - before["final_loss"]) < 1e-6 and abs(float(row[2]) - after["final_loss"]) < 1e-6
    assert abs(float(row[3]) - (after["final_loss"] - before["final_loss"])) < 1e-3
    assert "![training loss, before and after](loss.png)" in md and (repo / "pr" / "loss.png").stat().st_size > 1000

    r = cli(repo, "lineage", "models/adapter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"made in commit {second}" in r.stdout and "recorded in dvc.lock" in r.stdout
    assert f"git checkout {second}" in r.stdout and "every recorded hash and package version matches" in r.stdout
    r = cli(repo, "lineage", "models/export")
    assert r.returncode == 0 and f"made in commit {second}" in r.stdout

    # one byte of the raw training data changes: lineage names the file and fails
    data = repo / "data" / "example" / "sentiment_train.jsonl"
    raw = bytearray(data.read_bytes())
    raw[10] = ord("X") if raw[10] != ord("X") else ord("Y")
    data.write_bytes(bytes(raw))
    r = cli(repo, "lineage", "models/adapter")
    assert r.returncode == 1
    assert re.search(r"data/example/sentiment_train\.jsonl.*MISMATCH", r.stdout), r.stdout
    assert "1 recorded hash(es) and 0 package version(s) differ" in r.stdout


def test_a_fleet_report_shows_the_adapter_that_changed_and_names_the_others(tmp_path):
    """Params and metrics of two fleet adapters (fleet/resolved/<name>.yaml, fleet/<name>/reports/): a change to a
    gets its own section with its params and metric deltas; b, unchanged, is named in one line."""
    import yaml

    r = tmp_path / "r"
    r.mkdir()
    stage = {"foreach": ["a", "b"], "do": {"cmd": "true", "params": [{"fleet/resolved/${item}.yaml": ["train.lr"]}],
                                           "metrics": [{"fleet/${item}/reports/train/metrics.json": {"cache": False}}]}}
    (r / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))

    def write(name: str, lr: float, loss: float) -> None:
        (r / "fleet" / "resolved").mkdir(parents=True, exist_ok=True)
        (r / "fleet" / "resolved" / f"{name}.yaml").write_text(yaml.safe_dump({"train": {"lr": lr}}))
        (r / "fleet" / name / "reports" / "train").mkdir(parents=True, exist_ok=True)
        (r / "fleet" / name / "reports" / "train" / "metrics.json").write_text(json.dumps({"final_loss": loss}))

    write("a", 0.1, 0.5)
    write("b", 0.1, 0.7)
    sh(r, "git", "init", "-q")
    sh(r, sys.executable, "-m", "dvc", "init", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "fleet")
    write("a", 0.2, 0.4)
    out = cli(r, "report", "--base", "HEAD", "--out", "pr")
    assert out.returncode == 0, out.stderr
    md = (r / "pr" / "report.md").read_text()
    assert "### Fleet adapter `a` (fleet/dvc.yaml)" in md and "| train.lr | 0.1 | 0.2 |" in md
    assert "| fleet/a/reports/train/metrics.json:final_loss | 0.5 | 0.4 | -0.1 |" in md
    assert "Fleet adapters with no params or metrics change: b." in md and "fleet/b/" not in md


def test_the_report_puts_what_changed_first_names_both_machines_and_marks_deltas_within_the_tolerance(tmp_path):
    """Another hardware class in the run facts is said before any figure; a delta within --atol is marked, after
    those beyond it; unchanged metrics are counted, not listed; run facts come last, apart from the metrics."""
    import yaml

    r = tmp_path / "r"
    (r / "reports" / "train").mkdir(parents=True)
    spec = {"stages": {"evaluate": {"cmd": "true", "metrics": [{"reports/metrics.json": {"cache": False}}]}},
            "metrics": ["reports/train/run.json"]}
    (r / "dvc.yaml").write_text(yaml.safe_dump(spec))

    def write(accuracy: float, loss: float, seconds: float, isa: str) -> None:
        (r / "reports" / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "loss": loss, "rows": 32}))
        hw = {"machine": "x86_64", "cpu_isa": isa, "torch_threads": 2}
        (r / "reports" / "train" / "run.json").write_text(json.dumps({"seconds": seconds, "hardware": hw}))

    write(0.9, 0.5, 48.2, "avx512_bf16")
    sh(r, "git", "init", "-q")
    sh(r, sys.executable, "-m", "dvc", "init", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "one")
    write(0.905, 0.3, 75.3, "amx_bf16")
    out = cli(r, "report", "--base", "HEAD", "--out", "pr", "--atol", "0.01")
    assert out.returncode == 0, out.stderr
    md = (r / "pr" / "report.md").read_text()
    assert "**Runs on different hardware classes**: `HEAD` on x86_64 avx512_bf16 2 threads, this change on " \
           "x86_64 amx_bf16 2 threads" in md
    loss = md.index("| reports/metrics.json:loss | 0.5 | 0.3 | -0.2 |")
    accuracy = md.index("| reports/metrics.json:accuracy | 0.9 | 0.905 | +0.005 (within atol 0.01 + rtol 0) |")
    facts = md.index("Run facts (this machine and day, not the change):")
    assert md.index("different hardware classes") < loss < accuracy < facts
    assert "1 metric(s) unchanged." in md and "metrics.json:rows" not in md
    assert md.index("| reports/train/run.json:seconds | 48.2 | 75.3 |") > facts
    write(0.9, 0.5, 48.2, "avx512_bf16")
    md = cli(r, "report", "--base", "HEAD", "--out", "pr").stdout
    assert "Both runs on the same hardware class: x86_64 avx512_bf16 2 threads." in md and "No metric changed." in md
