"""The pipelines' file layout and stage addresses (pipeline/core/layout.py), and that no other module spells them."""

import ast
from pathlib import Path

from conftest import ROOT

from pipeline.core import layout


def test_stage_addresses_split_into_stage_and_adapter():
    assert layout.split_stage("fleet/dvc.yaml:train@chat") == ("train", "chat")
    assert layout.split_stage("train@my-customer_2") == ("train", "my-customer_2")
    assert layout.split_stage("train") == ("train", None)
    assert layout.split_stage("dvc.yaml:evaluate") == ("evaluate", None)
    assert layout.lock_name("fleet/dvc.yaml:gguf@chat") == "gguf@chat" and layout.lock_name("gguf") == "gguf"
    assert layout.lock_file("fleet/dvc.yaml:gguf@chat") == "fleet/dvc.lock" == layout.lock_file("train@a")
    assert layout.lock_file("gguf") == "dvc.lock" == layout.lock_file("dvc.yaml:train")


def test_a_stage_run_with_an_adapters_params_is_that_adapters_stage(tmp_path):
    assert layout.stage_of_params("export", Path("fleet/resolved/chat.yaml")) == "export@chat"
    assert layout.stage_of_params("export", tmp_path / "fleet" / "resolved" / "b-2.yaml") == "export@b-2"
    assert layout.stage_of_params("export", Path("params.yaml")) == "export"
    assert layout.stage_of_params("export", Path("fleet/params.yaml")) == "export"


def test_owner_of_a_path_is_the_default_job_the_fleet_or_an_adapter():
    assert layout.owner("params.yaml") == "" and layout.owner("reports/train/metrics.json") == ""
    assert layout.owner("fleet/params.yaml") == "fleet"
    assert layout.owner("fleet/resolved/chat.yaml") == "chat"
    assert layout.owner("fleet/chat/reports/evaluate/metrics.json") == "chat"


def test_adapter_names_are_the_resolved_params_files(tmp_path):
    fleet = tmp_path / "fleet"
    assert layout.adapter_names(fleet) == []
    for name in ("b", "a"):
        layout.resolved_params(fleet, name).parent.mkdir(parents=True, exist_ok=True)
        layout.resolved_params(fleet, name).write_text("task: chat\n")
    (fleet / "resolved" / "notes.txt").write_text("not an adapter")
    assert layout.adapter_names(fleet) == ["a", "b"]
    assert layout.adapter_dir(fleet, "a") == fleet / "a"


def test_only_the_layout_module_spells_the_fleet_folders():
    """A path component of the fleet's layout as a literal ("fleet", "resolved") anywhere else in pipeline/ is a
    second home for it (docstrings, help and messages may name the paths; the stage's name `STAGE = "fleet"`
    is a name, not a folder)."""
    found = []
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        if f.name == "layout.py":
            continue
        tree = ast.parse(f.read_text())
        names = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and [getattr(t, "id", None) for t in n.targets] == ["STAGE"]}
        for node in ast.walk(tree):
            if id(node) not in names and isinstance(node, ast.Constant) and node.value in ("fleet", "resolved", "fleet/dvc.yaml",
                                                                  "fleet/dvc.lock", "fleet/params.yaml"):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []
