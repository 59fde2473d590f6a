"""pipeline/recipes/dpo.py: the DPO loss and the implicit rewards on known values."""

import math

import torch

from pipeline.recipes.dpo import dpo_loss


def test_dpo_loss_known_values():
    one = torch.tensor([1.0])
    loss, c, r = dpo_loss(pc=one * 3, pr=one * 1, rc=one * 2, rr=one * 2, beta=0.5)  # chosen +1, rejected -1
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-1.0))), rel_tol=1e-6)
    assert float(c) == 0.5 and float(r) == -0.5
    assert math.isclose(float(dpo_loss(pc=one, pr=one, rc=one, rr=one, beta=0.5)[0]), math.log(2), rel_tol=1e-6)
