"""bench/ against the project's current API: every benchmark imports as a package module, and the train
stage's run as the benchmarks drive it (bench.stage_run.fit) trains what the train stage trains."""

import importlib
import pkgutil
import re
from pathlib import Path

import bench


def test_every_benchmark_imports():
    names = [m.name for m in pkgutil.iter_modules(bench.__path__)]
    assert len(names) >= 8
    for name in names:
        importlib.import_module(f"bench.{name}")


def makefile_bench_list(text: str) -> set[str]:
    """The names in the Makefile's `BENCH ?=` list (continued over backslash-ended lines)."""
    first = re.search(r"^BENCH \?=((?:.*\\\n)*.*)$", text, re.M)
    return set(first.group(1).replace("\\\n", " ").split()) if first else set()


def test_make_bench_runs_every_benchmark():
    """Every module of bench/ that runs as a program (`python -m bench.NAME`) is in `make bench`'s list."""
    folder = Path(bench.__path__[0])
    programs = {f.stem for f in folder.glob("*.py") if 'if __name__ == "__main__"' in f.read_text()}
    listed = makefile_bench_list((folder.parent / "Makefile").read_text())
    assert len(programs) >= 14 and programs - listed == set() and listed - programs == set(), (programs, listed)
    assert makefile_bench_list("BENCH ?= a b \\\n\tc\nbench: setup\n") == {"a", "b", "c"}  # the reader can fail


def test_the_benchmarks_train_run_is_the_train_stages(trained, tiny_base, tmp_path):
    """The run the benchmarks time trains what the stage trains; the per-step hook the step profile and the accuracy
    curve use sees every step, and the curve's accuracy of the trained model is the evaluate stage's."""
    from bench.accuracy_curve import accuracy
    from bench.stage_run import fit
    from pipeline.core.io import read_jsonl
    from pipeline.core.loading import load_tokenizer
    from pipeline.stages import evaluate

    steps = []
    model, metrics, facts = fit(trained["params"], trained["tokenized"], tiny_base, tmp_path / "live",
                                tmp_path / "ckpt", lambda recipe, seconds, out: steps.append((seconds, out[1])))
    assert metrics["final_loss"] == trained["metrics"]["final_loss"] and metrics["steps"] == trained["metrics"]["steps"]
    assert facts["tokens"] > 0 and facts["peak_rss_mb"] > 0
    assert len(steps) == metrics["steps"] and all(s > 0 for s, _ in steps)
    assert sum(n for _, n in steps) == facts["tokens"]
    rows = read_jsonl(trained["formatted"] / "validation.jsonl")
    got = accuracy(model, load_tokenizer(tiny_base), rows, trained["params"].train.precision)
    r = evaluate.run(trained["params"], tiny_base, trained["adapter"], trained["formatted"], trained["tokenized"],
                     tmp_path / "ev", trained["validated"])
    assert round(got["accuracy"], 4) == r["adapter"]["accuracy"]
    assert round(got["first_token"], 4) == r["rules"]["adapter"]["first_token"]["accuracy"]
    assert model.training  # scoring leaves the model as training had it


def test_a_benchmark_run_is_the_committed_params_with_its_case_and_shape():
    """The benchmarks keep no defaults of their own: a run is params.yaml as committed, its prompt case (whatever
    the workspace's format section says) and its shape and variant set."""
    from argparse import Namespace
    from pathlib import Path

    import yaml
    from conftest import ROOT

    from bench.stage_process import CASES, PARAMS_COMMIT
    from bench.stage_run import bench_params

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


def cells(text: str) -> list[list[str]]:
    """The cells of every row of the markdown tables in `text`, header rows included, separator rows not."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and set(line) - set("|:- ")]


def test_every_benchmark_table_is_drawn_one_way():
    """bench.machine.table: a header, a separator that GitHub reads as the alignment asked (first column left, the
    others right unless told), short rows padded blank, and an alignment of the wrong length refused."""
    import pytest

    from bench.machine import table

    text = table(["variant", "tok/s", "note"], [["d", "400", None], ["g", 300]])
    lines = text.splitlines()
    left, *right = lines[1].strip("|").split("|")
    assert left.startswith(":") and not left.endswith(":") and all(c.endswith(":") and c[0] == "-" for c in right)
    assert cells(text) == [["variant", "tok/s", "note"], ["d", "400", ""], ["g", "300", ""]]
    assert all(len(line) == len(lines[0]) for line in lines)  # padded: the raw file reads as a table too
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [], "l")


def test_the_load_table_gives_each_variant_its_share_of_its_own_speed_alone():
    """Under load, each variant's tokens/s against its own alone (the issue's measure), a variant kept out of the
    loaded runs (`--busy-variants`) said to be so, not shown as failed."""
    from bench.throughput_table import loaded_table

    res = {"train": {"d": {"tokens_per_second": 400.0}, "g": {"tokens_per_second": 300.0},
                     "x": {"tokens_per_second": 100.0}},
           "loaded": {"1": {"d": {"tokens_per_second": 300.0}, "g": {"tokens_per_second": 100.0}}}}
    rows = {r[0].split(":")[0]: r[1:] for r in cells("\n".join(loaded_table(res)))}
    assert rows["d"] == ["400", "300 (0.75)"] and rows["g"] == ["300", "100 (0.33)"]
    assert rows["x"] == ["100", "not run"]


def test_the_step_profile_sorts_operators_by_kind_and_phase():
    """bench.step_profile files each operator call under what ran it (forward, autograd's backward, the optimizer)
    and a kind; its table's kind shares add up to the whole."""
    from bench.step_profile import kind, markdown, phase

    backward = ["autograd::engine::evaluate_function: MmBackward0", "ProfilerStep#5"]
    assert (kind("aten::mm", backward), phase(backward)) == ("matmul", "backward")
    assert kind("aten::mul", ["_MaskDropout"]) == "dropout" and kind("aten::random_", ["_MaskDropout"]) == "dropout"
    assert kind("aten::mul", ["aten::rms_norm"]) == "elementwise" and kind("aten::fill_", []) == "fill"
    step = ["Optimizer.step#AdamW.step"]
    assert (kind("aten::mul", step), phase(step)) == ("optimizer", "optimizer")
    ops = [{"op": "aten::mm", "phase": "forward", "kind": "matmul", "ms": 30.0, "calls": 4},
           {"op": "aten::mul", "phase": "backward", "kind": "elementwise", "ms": 10.0, "calls": 8}]
    res = {"date": "d", "machine": "m", "torch": "t", "command": "--steps 3",
           "cases": {"short": {"operators": ops, "profiled_steps": 2, "late_tokens_per_second": 500.0,
                               "final_loss": 0.5}}}
    rows = cells(markdown(res, top=5))
    assert ["matmul", "15", "75.0%"] in rows and ["elementwise", "5", "25.0%"] in rows
    assert ["`aten::mul`", "backward", "elementwise", "5.0", "4", "25.0%"] in rows


def test_an_accuracy_curve_takes_train_overrides_as_dvc_exp_run_does():
    import pytest

    from bench.accuracy_curve import overrides
    from pipeline.core.overlay import merge as merged  # what the curve lays its overrides over params with

    over = overrides(["train.lr=2e-3", "train.lora.lora_dropout=0", "train.lora.layers_to_transform=[28, 29]"])
    assert over == {"lr": 2e-3, "lora": {"lora_dropout": 0, "layers_to_transform": [28, 29]}}
    base = {"lr": 1e-3, "epochs": 3, "lora": {"r": 16, "lora_dropout": 0.05}}
    assert merged(base, over) == {"lr": 2e-3, "epochs": 3,
                                  "lora": {"r": 16, "lora_dropout": 0, "layers_to_transform": [28, 29]}}
    with pytest.raises(SystemExit, match="train.KEY=VALUE"):
        overrides(["lr=1"])


def test_the_cpu_class_trace_is_the_same_for_the_same_run_and_names_the_first_operation_that_differs(
        trained, tiny_base, tmp_path):
    """bench.cpu_classes: two runs of the same params give the same trace (every loss, operation, gradient and
    parameter); a changed activation is named at its step and module; bf16 against fp32 parts at step 1."""
    import copy

    from bench.cpu_classes import first_difference, train_traced

    p = trained["params"]
    runs = [train_traced(p, trained["tokenized"], tiny_base, 2, tmp_path / str(i)) for i in range(2)]
    a, b = runs
    ops, steps = a["trace"]["operations"], a["trace"]["steps"]
    assert len(a["losses"]) == trained["metrics"]["steps"] and len(steps) == 2
    assert len(ops) > 20 and all(steps[1]["forward"]) and all(steps[1]["grads"]) and all(steps[1]["params"])
    assert len(steps[1]["grads"]) == len(a["trace"]["parameters"]) > 0
    assert first_difference(a, b).startswith("identical")
    c = copy.deepcopy(b)
    c["trace"]["steps"][1]["forward"][5] = "0" * 16
    assert first_difference(a, c) == f"step 2: forward output of {ops[5]} (of {len(ops)} operations in call order)"
    assert p.train.precision == "fp32"
    bf16 = p.model_copy(update={"train": p.train.model_copy(update={"precision": "bf16"})})
    other = train_traced(bf16, trained["tokenized"], tiny_base, 1, tmp_path / "bf16")
    assert first_difference(a, other).startswith("step 1: ")
