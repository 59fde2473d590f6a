"""The fine-tuning methods, registered here by name (`params.yaml: train.method`), loaded when asked for.

Every method PEFT knows is available by its name through `Peft`; the ones in OWN add to that (AdaLoRA's
step hooks) or are this project's own (`full`, `bitfit`). Adding a method is one new module
implementing `pipeline.methods.base.Method` and one line in OWN. A method's module is imported only
when `get` names it. What a trained folder holds is loaded by pipeline/methods/adapters.py.
"""

from __future__ import annotations

import importlib

from pipeline.core.params import ParamsError
from pipeline.methods.base import Method

# name -> "module:Class" (the PEFT method names not listed here are pipeline.methods.peft:Peft)
OWN = {
    "full": "pipeline.methods.full:Full",
    "bitfit": "pipeline.methods.bitfit:BitFit",
    "adalora": "pipeline.methods.peft:AdaLora",
}
PEFT = "pipeline.methods.peft:Peft"
LOADED: list[str] = []  # the modules `get` imported in this process, in order (the deps tests read it)


def peft_names() -> list[str]:
    """The method names PEFT knows (lower case, as params name them)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return [str(k.value).lower() for k in PEFT_TYPE_TO_CONFIG_MAPPING]


def names() -> list[str]:
    """Every valid `train.method`: PEFT's methods and the registered ones."""
    return sorted({*peft_names(), *OWN})


def modules() -> list[str]:
    """Every module a method can come from."""
    return sorted({spec.split(":")[0] for spec in (*OWN.values(), PEFT)})


def get(name: str) -> Method:
    """The method registered as `name`, else PEFT's method of that name (one line listing the valid ones)."""
    if name in OWN:
        spec = OWN[name]
    elif name in peft_names():
        spec = PEFT
    else:
        raise ParamsError(f"params.yaml: 'train.method' is {name!r}; valid choices: {', '.join(names())}.")
    module, cls = spec.split(":")
    if module not in LOADED:
        LOADED.append(module)
    return getattr(importlib.import_module(module), cls)(name)


def check(t, dpo: bool = False) -> Method:
    """The method `train.method` names, its section `train.<name>` checked (`t`: the train params; `dpo`:
    the task trains with DPO, which needs a PEFT adapter: the reference is the base, the adapter disabled)."""
    method = get(t.method)
    try:
        raw = getattr(t, method.name)
    except AttributeError:
        raise ParamsError(f"params.yaml: 'train.method' is {method.name!r}: add its section 'train.{method.name}' "
                          "(the method's own arguments; {} for its defaults)") from None
    method.check(raw)
    if not method.peft and t.quantization:
        raise ParamsError(f"params.yaml: 'train.method' is {method.name!r}, which trains the base model's own "
                          "weights: 'train.quantization' must be null (a quantized base trains through an adapter)")
    if dpo and not method.peft:
        raise ParamsError(f"params.yaml: the task trains with DPO against the base model (the adapter disabled): "
                          f"'train.method' must be a PEFT method, not {method.name!r}.")
    return method
