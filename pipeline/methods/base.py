"""The shape every fine-tuning method has: build the trainable model, count, save and load it.

A method is a small class; `pipeline/methods/__init__.py` registers it by name (`train.method`).
PEFT's methods all share one class (`Peft`, any method PEFT knows, by name); a method that needs
more than its config class (AdaLoRA's step hooks) or trains the base model's own weights (`full`,
`bitfit`) is its own subclass. The train stage, `load_adapter`, predict and export call these
methods and never branch on a method's name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch


class Method:
    """One way to fine-tune. Subclasses set `name` and implement `build`, `save` and `load`."""

    name: str = ""
    peft: bool = False  # a PEFT adapter over the base (several can share one base; DPO's reference is the base)
    weights: str = "adapter_model.safetensors"  # the weights file its output folder holds
    section: Any = None  # the params model of its `train.<name>` section, for this project's own methods

    def configure(self, kwargs: dict, steps: int) -> dict:
        """The method's arguments, completed with what depends on the run (e.g. the total step count)."""
        return kwargs

    def build(self, model, t, steps: int):
        """The base model made trainable by this method (`t`: the train params section)."""
        raise NotImplementedError

    def trainable(self, model) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        return (sum(q.numel() for q in model.parameters() if q.requires_grad),
                sum(q.numel() for q in model.parameters()))

    def after_step(self, model, step: int) -> None:
        """Called after every optimizer step."""

    def penalty(self, model) -> torch.Tensor | None:
        """A term the method adds to every optimizer step's loss (AdaLoRA's orthogonal regularization);
        None: the loss is the response tokens' mean NLL alone."""
        return None

    def save(self, model, folder: Path) -> None:
        raise NotImplementedError

    def load(self, base, folder: Path, base_dir: Path, dev, adapter_name: str):
        """The trained model from its output `folder`, over `base` (the loaded base model)."""
        raise NotImplementedError


class FullModel(torch.nn.Module):
    """A model whose own weights were trained (`full`, `bitfit`) beside its base, answering to the part
    of the PEFT model interface the stages use: `disable_adapter()` switches to the base model,
    `merge_and_unload()` gives the fine-tuned model. Two copies of the weights."""

    def __init__(self, tuned, base) -> None:
        super().__init__()
        self.tuned, self.base = tuned, base
        self.active = tuned
        self.config = tuned.config

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.active.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self):
        previous, self.active = self.active, self.base
        try:
            yield
        finally:
            self.active = previous

    def merge_and_unload(self):
        return self.tuned

    def set_adapter(self, name: str) -> None:
        """One model, nothing to switch to (several adapters on one base need PEFT adapters)."""
