"""The shape every fine-tuning method has: check its params section, build the trainable model, count,
save and load it, and answer what it can do (capabilities) so no caller derives them itself.

A method is a small class; `pipeline/methods/__init__.py` registers it by name (`train.method`).
PEFT's methods all share one class (`Peft`, any method PEFT knows, by name); a method that needs
more than its config class (AdaLoRA's step hooks) or trains the base model's own weights (`full`,
`bitfit`) is its own subclass. The train stage, the evaluate and export stages, predict and the
recipes call these methods and never branch on a method's name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from pipeline.core.params import ParamsError


class Method:
    """One way to fine-tune. Subclasses implement `check`, `build`, `save` and `load`."""

    peft: bool = False  # a PEFT adapter over the base (several can share one base; DPO's reference is the base)
    weights: str = "adapter_model.safetensors"  # the weights file its output folder holds
    # params each stage reads for the method (DVC's params syntax): its own section, `train.<name>`
    reads: dict[str, tuple[str, ...]] = {"train": ("train.${train.method}",)}

    def __init__(self, name: str) -> None:
        self.name = name

    # ---- capabilities
    @property
    def prompt_learning(self) -> bool:
        """Virtual tokens before every row (prefix, prompt, P-tuning): no shared prefix, no packing, no
        KV cache of a shared prompt, nothing to merge."""
        return False

    @property
    def mergeable(self) -> bool:
        """Whether export can fold the training into the base weights."""
        return not self.prompt_learning

    def layouts(self, shared_prefix: bool, packing: bool) -> dict[str, bool]:
        """The batch layouts (pipeline/core/batching.py) this method's model runs: those asked for, less
        what virtual tokens before every row rule out (packing asked for is then an error)."""
        if self.prompt_learning and packing:
            raise ParamsError(f"params.yaml: 'train.packing' is true, but '{self.name}' adds virtual tokens before "
                              "every row, which packing cannot share between rows: set train.packing: false")
        return {"shared_prefix": shared_prefix and not self.prompt_learning, "packing": packing}

    # ---- params
    def check(self, section: Any) -> dict:
        """The method's `train.<name>` section, checked (ParamsError naming the key)."""
        raise NotImplementedError

    def configure(self, kwargs: dict, steps: int) -> dict:
        """The method's arguments, completed with what depends on the run (e.g. the total step count)."""
        return kwargs

    # ---- training
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

    # ---- output
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
