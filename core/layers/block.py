"""The pre-norm transformer block every transformer encoder is built from."""

from __future__ import annotations

import torch
from torch import nn

from core.layers.attention import create_attention
from core.layers.mlp import create_mlp
from core.layers.norm import create_norm


class TransformerBlock(nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)); each part chosen by name."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        attention: str = "sdpa",
        norm: str = "layernorm",
        mlp: str = "gelu",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = create_norm(norm, dim)
        self.attn = create_attention(attention, dim, heads, dim_head)
        self.norm2 = create_norm(norm, dim)
        self.mlp = create_mlp(mlp, dim, ratio=mlp_ratio, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of TransformerBlocks with a final norm; optional activation checkpointing per block."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, attention: str, norm: str, mlp: str,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, dim_head, attention, norm, mlp, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = create_norm(norm, dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
