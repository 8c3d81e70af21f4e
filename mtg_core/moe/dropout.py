"""LoRA dropout on the CPU from 16 random bits per element instead of a Bernoulli sample each.

torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`, on one thread, ~6 ns an
element here), then divides and multiplies: with LoRA dropout on the tiny base that was a quarter of a
micro-batch's forward and backward (issue 23, docs/performance.md). Here each element's keep or drop
is read from 16 random bits, four elements per 64-bit draw, compared straight into a mask of the
input's dtype. What peft's dropout means is kept: every LoRA module's input gets its own mask,
independent per element and per call, scaled by 1 / (1 - p), and a checkpointed layer's recompute
draws the same masks (torch saves and restores the CPU generator for it, as for its own dropout). The
one difference: the drop probability is p rounded to a multiple of 1/65536 (0.1 -> 0.1000061). On a
GPU torch's fused dropout is already cheap, and runs as it is.
"""

from __future__ import annotations

import torch
from torch import nn

LANES = 4  # int16 lanes per int64 draw


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` and `dtype`, each element 1 (kept) with probability 1 - p (p rounded to 1/65536), else 0."""
    count = shape.numel()
    draws = torch.empty(-(-count // LANES), dtype=torch.int64, device=device).random_(-2**63, None)  # all 64 bits random
    lanes = draws.view(torch.int16)[:count].view(shape)  # uniform on [-32768, 32767]
    # Written straight into x's dtype: a bool mask costs a conversion inside the multiplication (4x slower on the CPU)
    return torch.ge(lanes, round(p * 65536) - 32768, out=torch.empty(shape, dtype=dtype, device=device))


def dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability p, without the 1 / (1 - p) scaling (the caller folds it in)."""
    return x * keep_mask(x.shape, p, x.dtype, x.device)


class LoraDropout(nn.Dropout):
    """nn.Dropout whose CPU training path draws its mask from 16 bits per element (see the module's docstring)."""

    def masks(self, x: torch.Tensor) -> bool:
        """Whether this call takes the 16-bit path (else nn.Dropout's own)."""
        return self.training and x.device.type == "cpu" and 0 < self.p < 1 and not self.inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.masks(x):
            return super().forward(x)
        return dropped(x, self.p).mul_(1 / (1 - self.p))


def use_lora_dropout(model: nn.Module) -> int:
    """Swap peft's nn.Dropout in every LoRA layer of `model` for LoraDropout (same p); returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[adapter] = LoraDropout(dropout.p)
                swapped += 1
    return swapped
