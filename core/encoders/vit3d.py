"""A plain 3D ViT (Dosovitskiy et al. 2021 with cubes): cubic patches → one transformer over all of them.

The volume is cut into ``patch``³ cubes, each linearly embedded (a conv with
kernel = stride = patch), a learned position table is added, and one
transformer (attention, norm and MLP chosen by the axes) attends across all
patches. ``pool: cls`` prepends a learned CLS token and returns its output;
``pool: mean`` averages the patch tokens. Global attention over every patch
makes this the costly baseline that CT-ViT's factorised attention avoids.

Presets:

- ``tiny`` (CPU-sized, default): dim 64, depth 2, 4 heads × 16, patch 8 — 0.13 M params plus
  64 per patch position (0.13 M in all at 16 × 32 × 32, 32 patches).
- ``base``: ViT-B — dim 768, depth 12, 12 heads × 64, patch 16 — 88.2 M params plus 768 per
  patch position (98.5 M in all at 240 × 480 × 480, 13,500 patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.layers.block import Transformer
from core.registry import ConfigError


@dataclass
class ViT3DArgs:
    """3D ViT hyper-parameters (one preset = one of these)."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    dim_head: int = 16
    patch: int = 8
    pool: Literal["cls", "mean"] = "cls"
    mlp_ratio: float = 4.0
    dropout: float = 0.0


PRESETS = {
    "tiny": ViT3DArgs(),
    "base": ViT3DArgs(dim=768, depth=12, heads=12, dim_head=64, patch=16),
}


class ViT3D(nn.Module):
    """3D ViT over a fixed input shape (D, H, W); see the module docstring."""

    def __init__(self, args: ViT3DArgs, input_shape: tuple[int, int, int], attention: str, norm: str, mlp: str) -> None:
        super().__init__()
        if any(size % args.patch for size in input_shape):
            raise ConfigError(
                f"data.target_shape {list(input_shape)} must be divisible by the vit3d patch {args.patch} in every "
                f"dimension; change data.target_shape or model.encoder_args.patch"
            )
        self.args = args
        self.grid = tuple(size // args.patch for size in input_shape)
        num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = nn.Conv3d(1, args.dim, args.patch, stride=args.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, args.dim)) if args.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + (args.pool == "cls"), args.dim) * 0.02)
        self.transformer = Transformer(args.dim, args.depth, args.heads, args.dim_head, attention, norm, mlp,
                                       mlp_ratio=args.mlp_ratio, dropout=args.dropout)
        self.out_dim = args.dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in backward instead of storing them."""
        self.transformer.grad_checkpointing = enable

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → encoded tokens (B, [1 +] patches, dim), the CLS token first when pooling by it."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.transformer(tokens + self.pos_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)


@register_encoder("vit3d", axes={"attention": "sdpa", "norm": "layernorm", "mlp": "gelu"})
def vit3d(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> ViT3D:
    """Plain 3D ViT with cubic patches; presets ``tiny`` (CPU-sized, default) and ``base`` (ViT-B)."""
    return ViT3D(resolve_preset(cfg, PRESETS, "tiny"), tuple(input_shape), **resolve_axes(cfg))
