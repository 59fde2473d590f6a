"""Reproducibility as a checked property: the same commit gives the same dvc.lock in a fresh clone,
every stage's deps cover its imports, and `peftflow verify` names what differs."""

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, STAGES, sh

from pipeline.dvcspec import closure
from pipeline.verify import verify


def outs(lock_file: Path) -> dict:
    lock = yaml.safe_load(lock_file.read_text())["stages"]
    return {o["path"]: o["md5"] for s in lock.values() for o in s["outs"]}


def test_a_fresh_clone_gives_the_same_dvc_lock_and_verify_names_a_changed_byte(history, tmp_path):
    """The history repository's dvc.lock was made in another folder, in two runs (every stage, then train
    onwards after a params change); a fresh clone of it reproduced in one run must give the same file."""
    one = tmp_path / "one"
    sh(tmp_path, "git", "clone", "-q", str(history["root"]), str(one))
    sh(one, sys.executable, "-m", "dvc", "repro")
    assert (one / "dvc.lock").read_text() == (history["root"] / "dvc.lock").read_text()
    assert {"models/base", "models/adapter", "models/export", "models/gguf"} <= set(outs(one / "dvc.lock"))
    # timings are run facts, kept out of every hashed output and out of git: the reproduction leaves git clean
    assert "seconds" in (one / "reports" / "train" / "resources.json").read_text()
    assert "seconds" not in (one / "reports" / "train" / "metrics.json").read_text()
    assert "seconds" not in (one / "reports" / "train" / "run.json").read_text()
    assert sh(one, "git", "status", "--porcelain") == ""

    sh(one, "git", "add", "-A")
    sh(one, "git", "commit", "-qm", "pipeline run", "--allow-empty")  # the outputs are the committed ones
    rows = verify(one, ["validate", "train"], log=lambda m: None)
    assert rows and all(r.same for r in rows), [r for r in rows if not r.same]

    data = one / "data" / "example" / "sentiment_train.jsonl"
    text = data.read_text()
    i = text.index('"', text.index('"sentence"') + len('"sentence"') + 1) + 1  # first letter of the first sentence
    data.write_text(text[:i] + ("X" if text[i] != "X" else "Y") + text[i + 1:])
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "validate", "--root", str(one)],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "validate" in r.stdout and "data/validated" in r.stdout and "differs" in r.stdout
    assert "train.jsonl" in r.stdout and "validation.jsonl" not in r.stdout


def test_no_stage_imports_another_stage():
    stages = sorted(f.stem for f in (ROOT / "pipeline" / "stages").glob("*.py") if f.stem != "__init__")
    assert set(stages) == set(STAGES) | {"fleet"}  # every stage of dvc.yaml, and the fleet's own
    for stage in stages:
        others = {f for f in closure(ROOT, f"pipeline.stages.{stage}")
                  if f.startswith("pipeline/stages/") and f not in (f"pipeline/stages/{stage}.py", "pipeline/stages/__init__.py")}
        assert not others, f"stage {stage} imports {others}"


def test_on_another_hardware_class_verify_compares_the_weights_numerically(tmp_path):
    """A folder that differs because it was made on another hardware class (AMX vs avx512_bf16, a GPU)
    is explained by the class and the weights' largest difference, not left a bare mismatch."""
    import hashlib
    import json

    import torch
    from safetensors.torch import save_file

    from pipeline.verify import explain

    cache = tmp_path / "cache"

    def put(data: bytes, suffix: str = "") -> str:  # as DVC's cache keeps an object (a folder's list: .dir)
        md5 = hashlib.md5(data).hexdigest() + suffix
        f = cache / "files" / "md5" / md5[:2] / md5[2:]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        return md5

    def folder(weight: float, isa: str) -> str:
        st = tmp_path / f"{isa}.safetensors"
        save_file({"w": torch.full((2, 2), weight)}, str(st))
        record = json.dumps({"hardware": {"machine": "x86_64", "cpu_isa": isa, "torch_threads": 2}}).encode()
        entries = [{"md5": put(st.read_bytes()), "relpath": "adapter_model.safetensors"},
                   {"md5": put(record), "relpath": "peftflow.json"}]
        return put(json.dumps(entries, sort_keys=True).encode(), ".dir")

    files, detail = explain(cache, folder(1.0, "amx_bf16"), folder(1.25, "avx512_bf16"))
    assert files == ["adapter_model.safetensors", "peftflow.json"]
    assert "hardware class differs: recorded x86_64 amx_bf16 2 threads, here x86_64 avx512_bf16 2 threads" in detail
    assert "adapter_model.safetensors: max |Δ| 0.25" in detail
