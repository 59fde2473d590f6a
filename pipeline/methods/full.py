"""`train.method: full`: every weight of the base model trains (the ceiling adapters are compared with).

Its output is a whole transformers checkpoint (`model.safetensors`); loaded beside the base, so that
evaluation can compare the two the way it compares an adapter with its base. Its section
`train.full` takes no arguments (`{}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.loading import load_base_model
from pipeline.core.params import Section, section
from pipeline.methods.base import FullModel, Method


class FullSection(Section):
    """`train.full` in params.yaml: no arguments."""


class Full(Method):
    weights = "model.safetensors"

    def check(self, raw: Any) -> dict:
        return section(FullSection, raw, "train.full").model_dump()

    def build(self, model, t, steps: int):
        self.check(getattr(t, self.name))
        model.requires_grad_(True)
        return model

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    def load(self, base, folder: Path, base_dir: Path, dev, adapter_name: str):
        return FullModel(load_base_model(folder, dev), base)
