"""The fine-tuning methods: one module each, registered here by name (`params.yaml: train.method`).

Every method PEFT knows is available by its name through `Peft`; the ones listed in METHODS add to
that (AdaLoRA's step hooks) or are this project's own (`full`, `bitfit`). Adding a method is one new
module implementing `pipeline.methods.base.Method` and one line in METHODS (with its import).
"""

from __future__ import annotations

from pipeline.methods.base import FullModel, Method
from pipeline.methods.bitfit import BitFit
from pipeline.methods.full import Full
from pipeline.methods.peft import AdaLora, Peft

METHODS: dict[str, Method] = {m.name: m for m in (Full(), BitFit(), AdaLora())}

__all__ = ["METHODS", "FullModel", "Method", "Peft", "get", "names"]


def names() -> list[str]:
    """Every valid `train.method`: PEFT's methods and the registered ones."""
    from pipeline.core.params import peft_methods

    return sorted({*peft_methods(), *METHODS})


def get(name: str) -> Method:
    """The method registered as `name`, else PEFT's method of that name."""
    from pipeline.core.params import ParamsError, peft_methods

    if name in METHODS:
        return METHODS[name]
    if name in peft_methods():
        return Peft(name)
    raise ParamsError(f"params.yaml: 'train.method' is {name!r}; valid choices: {', '.join(names())}.")
