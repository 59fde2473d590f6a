import json

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
