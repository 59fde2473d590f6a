"""`train.method: bitfit`: train only the bias terms (`train.bitfit.norms`: also the normalization weights).

Its output holds only the trained tensors (`bitfit.safetensors`); loading puts them back into a copy
of the base. A model with none of those parameters is an error saying what to set instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pipeline.core.loading import load_base_model
from pipeline.core.params import Section, section
from pipeline.core.stage import PipelineError
from pipeline.methods.base import FullModel, Method


class BitFitSection(Section):
    """`train.bitfit` in params.yaml."""

    norms: bool


def bitfit_names(model, norms: bool) -> list[str]:
    """The parameters BitFit trains: every bias, and with `norms` the normalization layers' weights."""
    names = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if norms:
        norm_modules = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
        names += [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in norm_modules and n not in names]
    return names


class BitFit(Method):
    weights = "bitfit.safetensors"

    def check(self, raw: Any) -> dict:
        return section(BitFitSection, raw, "train.bitfit").model_dump()

    def build(self, model, t, steps: int):
        names = set(bitfit_names(model, self.check(getattr(t, self.name))["norms"]))
        if not names:
            raise PipelineError(
                f"params.yaml: train.method 'bitfit': {type(model).__name__} has no bias parameters "
                "(Llama-style models have none), so BitFit would train nothing; set train.bitfit.norms: true to "
                "train the normalization weights instead (or use train.method: ln_tuning)")
        for n, q in model.named_parameters():
            q.requires_grad_(n in names)
        return model

    def save(self, model, folder: Path) -> None:
        save_file({n: q.detach().cpu().contiguous() for n, q in model.named_parameters() if q.requires_grad},
                  str(Path(folder) / self.weights), metadata={"format": "pt"})

    def load(self, base, folder: Path, base_dir: Path, dev, adapter_name: str):
        tuned = load_base_model(base_dir, dev)  # the base with the trained biases (and norms) put back in
        result = tuned.load_state_dict(load_file(str(Path(folder) / self.weights)), strict=False)
        if result.unexpected_keys:
            raise PipelineError(f"{folder}: {self.weights} holds tensors the base model does not have: "
                                f"{result.unexpected_keys[:3]}")
        return FullModel(tuned, base)
