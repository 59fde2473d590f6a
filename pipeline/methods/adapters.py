"""What a method made, found and loaded: the method a trained folder was made with (from its record), the
checks before loading it (safetensors only, trained on these base weights) and the loading itself.

Used by the evaluate and export stages and by predict. Inputs: a base model folder and a trained folder
(`models/adapter`: a PEFT adapter, or the method's own weights). Output: the model, adapter on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import methods
from pipeline.core.loading import load_base_model
from pipeline.core.modeling import device
from pipeline.core.stage import PipelineError
from pipeline.methods.base import Method

RECORD = "peftflow.json"


def record_of(folder: Path) -> dict:
    """The record a trained folder carries (`peftflow.json`; empty for a folder made elsewhere)."""
    f = Path(folder) / RECORD
    return json.loads(f.read_text()) if f.exists() else {}


def trained_method(folder: Path) -> Method:
    """The method a trained folder was made with, from its record; a folder without one is taken for a
    PEFT LoRA adapter (PEFT reads its own config)."""
    name = record_of(folder).get("params", {}).get("train", {}).get("method")
    return methods.get(name or "lora")


def check_adapter(base_dir: Path, adapter_dir: Path, allow_other_base: bool = False) -> None:
    """A trained folder in safetensors, trained on the weights in `base_dir` (or a clear error)."""
    adapter_dir, base = Path(adapter_dir), Path(base_dir) / "base.json"
    record, method = record_of(adapter_dir), trained_method(adapter_dir)
    if method.peft and not (adapter_dir / "adapter_config.json").exists():
        raise PipelineError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    if not (adapter_dir / method.weights).exists():
        raise PipelineError(f"{adapter_dir}: no {method.weights}; pickle weights are refused")
    if record and base.exists() and not allow_other_base:
        want = record["base"]["weights_sha256"]
        have = json.loads(base.read_text())["weights_sha256"]
        if want != have:
            raise PipelineError(f"{adapter_dir} was trained on base weights {want[:12]}, but {base_dir} holds "
                                f"{have[:12]}: an adapter only fits the base model version it was trained on")


def load_adapter(base_dir: str | Path, adapter_dir: str | Path, dev: torch.device | None = None,
                 allow_other_base: bool = False, quantized: bool = True, adapter_name: str = "default"):
    """Base model + what training made of it (a PEFT adapter, or the method's own weights beside the base),
    refusing a folder trained on other base weights. The base is quantized as it was in training (QLoRA)
    unless `quantized` is false (merging)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    check_adapter(base_dir, adapter_dir, allow_other_base)
    quantization = record_of(adapter_dir).get("params", {}).get("train", {}).get("quantization")
    dev = dev or device()
    model = load_base_model(base_dir, dev, quantization if quantized else None)
    return trained_method(adapter_dir).load(model, adapter_dir, base_dir, dev, adapter_name).eval()
