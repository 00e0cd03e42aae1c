"""Feed-forward blocks by name: ``gelu`` (baseline), ``swiglu`` and ``geglu``.

The gated variants use hidden = 2/3 · ratio · dim (rounded up to a multiple
of 8), so their three matrices hold about as many parameters as the two of the
GELU MLP (Shazeer 2020, "GLU Variants Improve Transformer"). ``hidden`` sets
the width directly and ``bias=False`` drops the biases (CT-CLIP's
feed-forward: GEGLU, hidden int(4 · 2/3 · dim) = 1365 at dim 512, no biases).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from core.registry import MLP


class GeluMLP(nn.Module):
    """fc2(GELU(fc1(x))) with hidden = ratio · dim."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class GatedMLP(nn.Module):
    """fc2(act(x·W_gate) ⊙ (x·W_value)): SwiGLU with act = SiLU, GEGLU with act = GELU."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0, act: str = "silu",
                 hidden: int | None = None, bias: bool = True) -> None:
        super().__init__()
        hidden = hidden or 8 * math.ceil(2 * ratio * dim / 3 / 8)
        self.act = {"silu": F.silu, "gelu": F.gelu}[act]
        self.fc_gate = nn.Linear(dim, hidden, bias=bias)
        self.fc_value = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc_gate(x)) * self.fc_value(x)))


@MLP.register("gelu")
def gelu(dim: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None,
         bias: bool = True) -> nn.Module:
    """The transformer baseline MLP."""
    return GeluMLP(dim, ratio, dropout, hidden=hidden, bias=bias)


@MLP.register("swiglu")
def swiglu(dim: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None,
           bias: bool = True) -> nn.Module:
    """SiLU-gated MLP (LLaMA, the seed paper's modern configuration)."""
    return GatedMLP(dim, ratio, dropout, act="silu", hidden=hidden, bias=bias)


@MLP.register("geglu")
def geglu(dim: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None,
          bias: bool = True) -> nn.Module:
    """GELU-gated MLP."""
    return GatedMLP(dim, ratio, dropout, act="gelu", hidden=hidden, bias=bias)


def create_mlp(name: str, dim: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None,
               bias: bool = True) -> nn.Module:
    """Build the MLP registered as ``name`` mapping ``dim`` → ``dim`` (``hidden``: width instead of ``ratio``)."""
    return MLP.get(name)(dim, ratio=ratio, dropout=dropout, hidden=hidden, bias=bias)
