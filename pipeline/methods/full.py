"""`train.method: full`: every weight of the base model trains (the ceiling adapters are compared with).

Its output is a whole transformers checkpoint (`model.safetensors`); loaded beside the base, so that
evaluation can compare the two the way it compares an adapter with its base.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.methods.base import FullModel, Method


class Full(Method):
    name = "full"
    weights = "model.safetensors"

    def build(self, model, t, steps: int):
        model.requires_grad_(True)
        return model

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    def load(self, base, folder: Path, base_dir: Path, dev, adapter_name: str):
        from pipeline.core.modeling import load_base_model

        return FullModel(load_base_model(folder, dev), base)
