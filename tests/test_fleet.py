"""The fleet: stage `fleet` (each adapter's whole params from params.yaml and fleet/params.yaml), fleet/dvc.yaml
made from dvc.yaml, and, measured on the tiny model in a scratch DVC project (tests/contract_harness.py
--fleet), the rerun rules: an edit to one adapter reruns only its stages, a shared default the stages of the
adapters that do not override it, a new adapter only its own chain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, raw_params

from pipeline import dvcspec
from pipeline.core.params import ParamsError
from pipeline.stages import fleet

SENTIMENT = {"task": "classification", "format": {"template": "prompts/sentiment.jinja"}, "train": {"method": "lora"},
             "data": {"train": "data/example/sentiment_train.jsonl",
                      "validation": "data/example/sentiment_validation.jsonl"}}


def write(tmp: Path, adapters: dict, text: str | None = None, **defaults) -> tuple[Path, Path]:
    params, spec = tmp / "params.yaml", tmp / "fleet.yaml"
    params.write_text(yaml.safe_dump(raw_params(**defaults), sort_keys=False))
    spec.write_text(text if text is not None else yaml.safe_dump({"adapters": adapters}, sort_keys=False))
    return params, spec


def test_an_adapter_is_the_defaults_with_its_overrides_laid_over(tmp_path):
    over = {"train": {"method": "lora", "lr": 0.02, "lora": {"r": 4}}}
    params, spec = write(tmp_path, {"a": SENTIMENT, "b": {**SENTIMENT, **over}}, **{"train.epochs": 3})
    fleet.run(params, spec, tmp_path / "out")
    a = yaml.safe_load((tmp_path / "out" / "a.yaml").read_text())
    b = yaml.safe_load((tmp_path / "out" / "b.yaml").read_text())
    assert a == raw_params(**{"train.epochs": 3})  # the example data and template are the defaults' own
    assert b["train"]["lr"] == 0.02 and a["train"]["lr"] == raw_params()["train"]["lr"]
    assert b["train"]["lora"] == {**a["train"]["lora"], "r": 4}  # a nested mapping merges key by key
    assert b["train"]["epochs"] == 3  # a default no adapter overrides reaches every adapter
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.yaml", "b.yaml"]


def test_a_removed_adapter_leaves_no_params_behind(tmp_path):
    params, spec = write(tmp_path, {"a": SENTIMENT, "b": SENTIMENT})
    fleet.run(params, spec, tmp_path / "out")
    spec.write_text(yaml.safe_dump({"adapters": {"a": SENTIMENT}}))
    fleet.run(params, spec, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.yaml"]


@pytest.mark.parametrize(("adapters", "message"), [
    ({"a": {**SENTIMENT, "train": {"method": "lora", "lrr": 0.1}}},
     r"fleet.yaml: adapter 'a' \(params.yaml with its overrides\): unknown key 'train.lrr'. Did you mean 'lr'"),
    ({"a": {**SENTIMENT, "train": {"method": "lora", "lr": "fast"}}}, r"adapter 'a'.*'train.lr' must be a number"),
    ({"a": {**SENTIMENT, "base": {"dtype": "bfloat16"}}}, r"'adapters.a.base': the fleet shares params.yaml's base"),
    ({"a": {k: v for k, v in SENTIMENT.items() if k != "format"}}, r"'adapters.a' must set 'format.template'"),
    ({"Big A": SENTIMENT}, r"adapter name 'Big A': lower-case letters"),
    ({"a": {**SENTIMENT, "train": {"method": "nope"}}}, r"adapter 'a'.*nope"),
    ({}, r"'adapters' must be a mapping of at least one adapter"),
])
def test_a_bad_fleet_is_one_line_naming_the_adapter_and_key_and_writes_nothing(tmp_path, adapters, message):
    params, spec = write(tmp_path, {"a": SENTIMENT})
    fleet.run(params, spec, tmp_path / "out")
    before = (tmp_path / "out" / "a.yaml").read_text()
    spec.write_text(yaml.safe_dump({"adapters": adapters}))
    with pytest.raises(ParamsError, match=message) as e:
        fleet.run(params, spec, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.yaml"]
    assert (tmp_path / "out" / "a.yaml").read_text() == before


def test_the_fleet_file_holds_adapters_only_and_a_windows_export_is_read(tmp_path):
    params, spec = write(tmp_path, {}, text="adapters: {}\nadapter: {}\n")
    with pytest.raises(ParamsError, match="unknown key 'adapter'"):
        fleet.run(params, spec, tmp_path / "out")
    spec.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({"adapters": {"a": SENTIMENT}}).replace("\n", "\r\n").encode())
    assert list(fleet.run(params, spec, tmp_path / "out")) == ["a"]


def test_the_fleet_stage_is_a_program_that_exits_2_on_a_bad_fleet(tmp_path):
    params, spec = write(tmp_path, {"a": {**SENTIMENT, "base": {}}})
    r = subprocess.run([sys.executable, "-m", "pipeline.stages.fleet", "--fleet", str(spec), "--params", str(params),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "adapters.a.base" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_example_fleet_resolves(tmp_path):
    resolved = fleet.run(ROOT / "params.yaml", ROOT / "fleet" / "params.yaml", tmp_path / "out")
    assert {p["task"] for p in resolved.values()} >= {"classification", "instruction", "chat"}
    committed = {f.stem: f.read_text() for f in (ROOT / "fleet" / "resolved").glob("*.yaml")}
    assert committed == {f.stem: f.read_text() for f in (tmp_path / "out").glob("*.yaml")}


# ---- fleet/dvc.yaml, made from dvc.yaml -----------------------------------------------------------------

def test_fleet_dvc_yaml_runs_every_stage_of_dvc_yaml_per_adapter_but_the_shared_base():
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    spec = yaml.safe_load((ROOT / "fleet" / "dvc.yaml").read_text())["stages"]
    assert list(spec) == ["fleet", *(s for s in root if s != "base")]
    assert dvcspec.fleet_differences(ROOT) == []
    for name in list(spec)[1:]:
        do = spec[name]["do"]
        assert spec[name]["foreach"] == "${adapters}" and do["wdir"] == ".."
        assert do["cmd"].endswith("--params fleet/resolved/${key}.yaml")
        assert do["params"] == [{"fleet/resolved/${key}.yaml": [k.replace("${", "${item.")
                                                                for k in root[name]["params"]]}]
        outs = [next(iter(o)) if isinstance(o, dict) else o for k in ("outs", "metrics", "plots") for o in do.get(k, [])]
        assert outs and all(o.startswith("fleet/${key}/") for o in outs)
        assert "models/base" not in outs and all("models/base" == d or not d.startswith("models/base")
                                                 for d in do["deps"])
        words = do["cmd"].split()  # every path it is handed: its own (checkpoints too), the shared base's, its item's
        values = [w for i, w in enumerate(words[:-2]) if i and words[i - 1].startswith("--")]
        assert values and all(v.startswith(("fleet/${key}/", "${item.")) or v == "models/base" for v in values), values


# ---- the rerun rules, measured ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet_rules(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fleet")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "contract_harness.py"), "--task", "classification",
                        "--fleet", "--out", str(out / "r.json"), "--scratch", str(out / "s")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / "r.json").read_text())


def test_dvc_reruns_adapter_by_adapter(fleet_rules):
    """Per case (a shared default, one adapter's entry, its data, template or task code, a new adapter): the
    stages DVC names are the expected ones, and after the edit is undone it names none."""
    wrong = {name: c for name, c in fleet_rules["cases"].items() if c["got"] != c["expected"] or c["after_undo"]}
    assert wrong == {}
    assert fleet_rules["cases"]["params.yaml train.lr"]["got"] == ["train", "train@a"]  # b overrides lr
    assert fleet_rules["cases"]["a new adapter c"]["got"] and all(s.endswith("@c") for s in fleet_rules["cases"]["a new adapter c"]["got"])


def test_the_fleet_stage_declares_what_it_imports(fleet_rules):
    """Its code deps are what it imported, plus the task and method modules of adapters it did not meet."""
    declared, imported = set(fleet_rules["fleet_stage"]["declared"]), set(fleet_rules["fleet_stage"]["imported"])
    assert imported <= declared
    assert all(f.startswith(("pipeline/tasks/", "pipeline/methods/")) for f in declared - imported)
