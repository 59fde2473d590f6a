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
