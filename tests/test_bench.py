"""bench/ against the project's current API: every benchmark imports as a package module, and the train
stage's run as the benchmarks drive it (bench.train_throughput.fit) trains what the train stage trains."""

import importlib
import pkgutil

import bench


def test_every_benchmark_imports():
    names = [m.name for m in pkgutil.iter_modules(bench.__path__)]
    assert len(names) >= 8
    for name in names:
        importlib.import_module(f"bench.{name}")


def test_the_benchmarks_train_run_is_the_train_stages(trained, tiny_base, tmp_path):
    from bench.train_throughput import fit

    _, metrics, facts = fit(trained["params"], trained["tokenized"], tiny_base, tmp_path / "live", tmp_path / "ckpt")
    assert metrics["final_loss"] == trained["metrics"]["final_loss"] and metrics["steps"] == trained["metrics"]["steps"]
    assert facts["tokens"] > 0 and facts["peak_rss_mb"] > 0


def test_a_benchmark_run_is_the_committed_params_with_its_case_and_shape():
    """The benchmarks keep no defaults of their own: a run is params.yaml as committed, its prompt case (whatever
    the workspace's format section says) and its shape and variant set."""
    from argparse import Namespace
    from pathlib import Path

    import yaml
    from conftest import ROOT

    from bench.train_throughput import CASES, PARAMS_COMMIT, bench_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert PARAMS_COMMIT  # a commit, or "workspace" outside git
    for case, prompt in CASES.items():
        p = bench_params(Namespace(data=Path("fpb"), steps=3, batch_size=4, seed=7, case=case), max_batch_tokens=512)
        assert p.train.lora == raw["train"]["lora"] and p.train.lr == raw["train"]["lr"]
        assert p.train.warmup_ratio == raw["train"]["warmup_ratio"] and p.train.precision == raw["train"]["precision"]
        assert (p.train.max_steps, p.train.batch_size, p.seed, p.train.max_batch_tokens) == (3, 4, 7, 512)
        assert (p.format.template, p.format.chat_template) == (prompt["template"], prompt["chat_template"])
        assert (ROOT / p.format.template).is_file() and p.data.train == "fpb/train.jsonl"
    assert CASES["chat"]["template"] == raw["format"]["template"]  # the default job's prompt is a case


def test_the_load_table_gives_each_variant_its_share_of_its_own_speed_alone():
    """Under load, each variant's tokens/s against its own alone (the issue's measure), a variant kept out of the
    loaded runs (`--busy-variants`) said to be so, not shown as failed."""
    from bench.train_throughput import loaded_table

    res = {"train": {"d": {"tokens_per_second": 400.0}, "g": {"tokens_per_second": 300.0},
                     "x": {"tokens_per_second": 100.0}},
           "loaded": {"1": {"d": {"tokens_per_second": 300.0}, "g": {"tokens_per_second": 100.0}}}}
    rows = {line.split(":")[0].strip("| "): line for line in loaded_table(res) if line.startswith("| ")}
    assert "| 400 | 300 (0.75) |" in rows["d"] and "| 300 | 100 (0.33) |" in rows["g"]
    assert rows["x"].endswith("| 100 | not run |")
