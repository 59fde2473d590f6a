"""The optimizer step every training recipe takes: the optimizer (`train.optimizer`: AdamW, or
bitsandbytes' 8-bit / paged AdamW; LoRA+ through `train.loraplus_lr_ratio`: the B matrices at a larger
learning rate), fp16 loss scaling and gradient clipping (`train.grad_clip`).

Inputs: a model with trainable parameters, the train params. Output: an `OptimizerStep`.
"""

from __future__ import annotations

import importlib

import torch

PACKAGES = ("bitsandbytes",)  # its optimizers, named by module path below (env/<stage>.txt pins it)
OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw_8bit": "bitsandbytes.optim.AdamW8bit",
              "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit",
              "paged_adamw_32bit": "bitsandbytes.optim.PagedAdamW32bit"}


def optimizer_class(name: str) -> type:
    """`train.optimizer`: AdamW, or bitsandbytes' 8-bit / paged AdamW (8-bit states quarter the
    optimizer memory; paging moves states to CPU memory under GPU memory pressure, CUDA only:
    on a CPU bitsandbytes uses the same optimizer unpaged)."""
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


class OptimizerStep:
    """One optimizer step as every recipe takes it: fp16 loss scaling (a no-op for fp32 and bf16),
    gradient clipping at `train.grad_clip`, then the optimizer."""

    def __init__(self, optimizer, params: list, precision: str, grad_clip: float | None, dev) -> None:
        self.optimizer, self.params, self.grad_clip = optimizer, params, grad_clip
        self.scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    def zero(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def optimizer_step(model, lr: float, t, dev, loraplus: bool = True) -> OptimizerStep:
    """The optimizer over the trainable parameters (`train.optimizer`, LoRA+ when asked), as one step."""
    opt = optimizer(model, lr, t.weight_decay, t.loraplus_lr_ratio if loraplus else None, t.optimizer)
    return OptimizerStep(opt, [q for q in model.parameters() if q.requires_grad], t.precision, t.grad_clip, dev)
