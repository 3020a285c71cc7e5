"""Expert weights stored transposed: [E, d_in, d_out] views of [E, d_out, d_in] tensors (how
transformers keeps its experts). Their gradients are made in the same layout, so the parameter
takes them without a copy."""

from __future__ import annotations

import torch
from torch import Tensor


def transposed(weight: Tensor) -> bool:
    """Whether a weight [E, d_in, d_out] is stored as [E, d_out, d_in]."""
    return weight.stride(-2) == 1 and weight.stride(-1) == weight.shape[-2] != 1


def batched_weight_grad(t: Tensor, g: Tensor, weight: Tensor) -> Tensor:
    """t^T @ g per expert: t [E, C, d_in], g [E, C, d_out] -> [E, d_in, d_out] in `weight`'s
    layout."""
    if transposed(weight):
        return torch.bmm(g.transpose(1, 2), t).transpose(1, 2)
    return torch.bmm(t.transpose(1, 2), g)
