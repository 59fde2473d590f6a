"""pipeline/core/optim.py: the optimizer params name, LoRA+'s larger learning rate for B, and the step's
clipping and fp16 loss scaling."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import make_params

from pipeline.core.optim import OptimizerStep, optimizer, optimizer_class
from pipeline.core.params import ParamsError


def test_optimizer_is_chosen_by_params():
    assert optimizer_class(make_params(**{"train.optimizer": "adamw_8bit"}).train.optimizer) is bnb.optim.AdamW8bit
    assert optimizer_class("paged_adamw_32bit") is bnb.optim.PagedAdamW32bit
    assert optimizer_class(make_params().train.optimizer) is torch.optim.AdamW
    with pytest.raises(ParamsError, match="train.optimizer.*valid choices: adamw, adamw_8bit"):
        make_params(**{"train.optimizer": "adam8"})


def test_loraplus_gives_b_its_ratio_of_the_learning_rate(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    opt = optimizer(model, 1e-3, 0.0, 8.0)
    rates = {g["lr"] for g in opt.param_groups if g["params"]}
    assert rates == {1e-3, 8e-3}


def test_the_step_clips_the_gradient_and_scales_fp16_losses():
    w = torch.nn.Parameter(torch.zeros(3))
    step = OptimizerStep(torch.optim.SGD([w], lr=1.0), [w], "fp32", 0.5, torch.device("cpu"))
    step.zero()
    step.backward((w * torch.tensor([30.0, 40.0, 0.0])).sum())  # gradient norm 50, clipped to 0.5
    step.step()
    assert w.detach().tolist() == pytest.approx([-0.3, -0.4, 0.0])
    assert not OptimizerStep(torch.optim.SGD([w], lr=1.0), [w], "bf16", None, torch.device("cpu")).scaler.is_enabled()
