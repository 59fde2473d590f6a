"""PEFT methods: the few that need more than their config class, each a small same-shaped unit.

Every PEFT method is available by name (`train.method`), configured by its own config class's
arguments (`train.<method>`). A method listed here adds hooks to that:
  - `configure(kwargs, steps)`: fill arguments that depend on the run (AdaLoRA's `total_step`);
  - `after_step(model, step)`: called after each optimizer step (AdaLoRA's rank reallocation).
One `register(...)` line adds a method's hooks.
Quantized bases (QLoRA), LoRA+ and the optimizer are not methods but training options,
`train.quantization` (BitsAndBytesConfig arguments), `train.loraplus_lr_ratio` and
`train.optimizer` (AdamW or bitsandbytes' 8-bit / paged AdamW), handled here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Hooks:
    configure: Callable[[dict, int], dict] = lambda kwargs, steps: kwargs
    after_step: Callable[[object, int], None] = lambda model, step: None


HOOKS: dict[str, Hooks] = {}


def register(name: str, **hooks) -> None:
    HOOKS[name] = Hooks(**hooks)


def hooks(method: str) -> Hooks:
    return HOOKS.get(method, Hooks())


register(
    "adalora",
    configure=lambda kw, steps: {**kw, "total_step": kw.get("total_step") or steps},
    after_step=lambda model, step: model.base_model.update_and_allocate(step),
)


# Target-module presets: `target_modules: attention | mlp | attention+mlp` names these layers for
# the base model's architecture (config.model_type); "all-linear" is PEFT's own and works as is.
ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"], "gpt_neox": ["query_key_value", "dense"], "t5": ["q", "k", "v", "o"],
}
MLP = {
    "llama": ["gate_proj", "up_proj", "down_proj"], "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"], "qwen3": ["gate_proj", "up_proj", "down_proj"],
    "gemma": ["gate_proj", "up_proj", "down_proj"], "phi3": ["gate_up_proj", "down_proj"],
    "gpt2": ["c_fc", "mlp.c_proj"], "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"], "t5": ["wi", "wo"],
}
PRESETS = {"attention": (ATTENTION,), "mlp": (MLP,), "attention+mlp": (ATTENTION, MLP)}


def resolve_targets(kwargs: dict, model_type: str) -> dict:
    """Replace a preset name in `target_modules` by the architecture's layer names."""
    preset = kwargs.get("target_modules")
    if not isinstance(preset, str) or preset not in PRESETS:
        return kwargs
    tables = PRESETS[preset]
    if any(model_type not in t for t in tables):
        from pipeline.stage import PipelineError

        raise PipelineError(f"params.yaml: target_modules preset '{preset}' is not defined for model type "
                            f"'{model_type}' (known: {', '.join(sorted(ATTENTION))}); list the layer names instead")
    names: list[str] = []
    for t in tables:
        names += t[model_type]
    return {**kwargs, "target_modules": names}


def quantization_config(q: dict | None):
    """`train.quantization` (BitsAndBytesConfig's own arguments) as a config object, or None."""
    if not q:
        return None
    from transformers import BitsAndBytesConfig

    q = dict(q)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(q.get(key), str):
            q[key] = getattr(torch, q[key])
    return BitsAndBytesConfig(**q)


OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw_8bit": "bitsandbytes.optim.AdamW8bit",
              "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit",
              "paged_adamw_32bit": "bitsandbytes.optim.PagedAdamW32bit"}


def optimizer_class(name: str) -> type:
    """`train.optimizer`: AdamW, or bitsandbytes' 8-bit / paged AdamW (8-bit states quarter the
    optimizer memory; paging moves states to CPU memory under GPU memory pressure, CUDA only:
    on a CPU bitsandbytes uses the same optimizer unpaged)."""
    import importlib

    module, cls = OPTIMIZERS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def optimizer(model, lr: float, weight_decay: float, loraplus_lr_ratio: float | None, name: str = "adamw"):
    """The optimizer over the trainable parameters; with LoRA+ the B matrices get `lr * loraplus_lr_ratio`."""
    cls = optimizer_class(name)
    if loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         weight_decay=weight_decay)
    params = [q for q in model.parameters() if q.requires_grad]
    return cls(params, lr=lr, weight_decay=weight_decay)


def save(model, folder: str | Path) -> None:
    """`save_pretrained` in safetensors, with byte-stable PEFT configs: PEFT keeps some arguments
    (`target_modules`, ...) as sets and writes them in Python's per-process hash order, so two
    identical runs would write different `adapter_config.json` files; they are written sorted."""
    import json

    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        f = folder / ("" if name == "default" else name) / "adapter_config.json"
        sets = {k: sorted(v) for k, v in vars(config).items() if isinstance(v, set)}
        if sets and f.exists():
            saved = json.loads(f.read_text())
            saved.update({k: v for k, v in sets.items() if k in saved})
            f.write_text(json.dumps(saved, indent=2, sort_keys=True))
