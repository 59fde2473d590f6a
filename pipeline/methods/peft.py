"""PEFT's methods, every one by name: `train.method: <name>`, `train.<name>`: its config class's own arguments
(`LoraConfig(**p.lora)`), passed through unchanged, plus target-module presets by architecture.

`AdaLora` is the one PEFT method that needs more than its config: the total step count, a rank
reallocation after every optimizer step, and its orthogonal regularization in the loss. QLoRA (a
quantized base), LoRA+ and the optimizer are training options (`train.quantization`,
`train.loraplus_lr_ratio`, `train.optimizer`), not methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.core.loading import adapter_misfit
from pipeline.core.params import check_arguments
from pipeline.core.stage import PipelineError
from pipeline.methods.base import Method

# Target-module presets: `target_modules: attention | mlp | attention+mlp` names these layers for
# the base model's architecture (config.model_type); "all-linear" is PEFT's own and works as is.
ATTENTION = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"], "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"], "gpt_neox": ["query_key_value", "dense"], "t5": ["q", "k", "v", "o"],
}
MLP = {
    "llama": ["gate_proj", "up_proj", "down_proj"], "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"], "qwen3": ["gate_proj", "up_proj", "down_proj"],
    "gemma": ["gate_proj", "up_proj", "down_proj"], "gemma2": ["gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["gate_proj", "up_proj", "down_proj"], "phi3": ["gate_up_proj", "down_proj"],
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
        raise PipelineError(f"params.yaml: target_modules preset '{preset}' is not defined for model type "
                            f"'{model_type}' (known: {', '.join(sorted(ATTENTION))}); list the layer names instead")
    names: list[str] = []
    for t in tables:
        names += t[model_type]
    return {**kwargs, "target_modules": names}


def linear_layer_names(model) -> list[str]:
    """The distinct names of the model's linear layers (what `target_modules` can name)."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"})


def save_peft(model, folder: Path) -> None:
    """`save_pretrained` in safetensors, with byte-stable configs: PEFT keeps some arguments
    (`target_modules`, ...) as sets and writes them in Python's per-process hash order, so two
    identical runs would write different `adapter_config.json` files; they are written sorted."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        f = folder / ("" if name == "default" else name) / "adapter_config.json"
        sets = {k: sorted(v) for k, v in vars(config).items() if isinstance(v, set)}
        if sets and f.exists():
            saved = json.loads(f.read_text())
            saved.update({k: v for k, v in sets.items() if k in saved})
            f.write_text(json.dumps(saved, indent=2, sort_keys=True))


def config_classes() -> dict[str, type]:
    """PEFT method name (lower case, as used in params) -> its config class."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


class Peft(Method):
    """Any PEFT method, by the name PEFT gives it (lora, DoRA as lora's `use_dora`, ia3, prefix_tuning, ...)."""

    peft = True

    @property
    def config_class(self) -> type:
        return config_classes()[self.name]

    @property
    def prompt_learning(self) -> bool:
        from peft import PromptLearningConfig

        return issubclass(self.config_class, PromptLearningConfig)

    def check(self, section: Any) -> dict:
        return check_arguments(self.config_class, section, f"train.{self.name}")

    def config(self, t, steps: int, model_type: str):
        """The PEFT config object, built from `train.<method>` as given (plus what the run decides)."""
        kwargs = resolve_targets(self.configure(self.check(getattr(t, self.name)), steps), model_type)
        kwargs.setdefault("task_type", "CAUSAL_LM")
        return self.config_class(**kwargs)

    def build(self, model, t, steps: int):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if t.quantization:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = self.config(t, steps, model.config.model_type)
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            targets = getattr(config, "target_modules", None)
            if targets is None or not any(w in str(e) for w in ("not found", "not supported", "no module")):
                raise
            shown = sorted(targets) if isinstance(targets, set) else targets
            raise PipelineError(
                f"params.yaml: train.{self.name}.target_modules {shown!r} matches no supported module of "
                f"{type(model).__name__}; its linear layers are: {', '.join(linear_layer_names(model))} "
                "(or use 'all-linear')") from None

    def trainable(self, model) -> tuple[int, int]:
        return model.get_nb_trainable_parameters()

    def save(self, model, folder: Path) -> None:
        save_peft(model, folder)

    def load(self, base, folder: Path, base_dir: Path, dev, adapter_name: str):
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)
        except Exception as e:  # safetensors, shape and config errors all mean the same to the user
            raise PipelineError(adapter_misfit(folder, e)) from None


class AdaLora(Peft):
    """AdaLoRA: its schedule needs the run's total step count, and ranks are reallocated after each step."""

    def configure(self, kwargs: dict, steps: int) -> dict:
        return {**kwargs, "total_step": kwargs.get("total_step") or steps}

    def after_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def penalty(self, model) -> torch.Tensor:
        """`orth_reg_weight` x the mean over the adapter's lora_A and lora_B of ||P Pᵀ - I||_F (rows of A,
        columns of B kept orthonormal): what PEFT's AdaLoraModel.forward adds to a loss it computes from
        labels. The train loop computes its own loss, so it asks for this term."""
        name = model.base_model.trainable_adapter_name
        terms = []
        for key, q in model.named_parameters():
            if key.endswith((f"lora_A.{name}", f"lora_B.{name}")):
                cov = q @ q.T if ".lora_A." in key else q.T @ q
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), dtype=cov.dtype, device=cov.device)))
        return model.peft_config[name].orth_reg_weight * torch.stack(terms).mean()
