"""Hybrid CNN–transformer encoder (CTInstruct; TransUNet-style): 2D ResNet per slice, then two transformers.

Every ``slab`` consecutive slices are stacked as the channels of one 2D image
(``slab: 1`` = every slice alone). A small 2D ResNet (stem conv 7×7 stride 2 +
max-pool, then stages of basic blocks, the first at stride 1 and the rest at
stride 2) turns each slab into a feature map; a 1×1 conv maps it to ``dim``
and its h·w cells become tokens. The spatial transformer attends among the
tokens of one slab (learned h·w position table); each slab is mean-pooled to
one token; the temporal transformer attends across slabs (learned position
per slab); the output is the mean over slabs. Attention, norm and MLP of both
transformers are the ablation axes; the ResNet uses BatchNorm and ReLU.

Presets:

- ``tiny`` (CPU-sized, default): slab 1, ResNet widths [16, 32, 64] × 1 block, dim 64,
  2 + 2 layers, 4 heads × 16 — 0.28 M params (at 16 × 32 × 32).
- ``base``: slab 4, ResNet widths [64, 128, 256] × 2 blocks (ResNet-18's first three
  stages), dim 512, 4 + 4 layers, 8 heads × 64 — 28.6 M params (at 240 × 480 × 480).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.layers.block import Transformer
from core.registry import ConfigError


@dataclass
class HybridArgs:
    """Hybrid encoder hyper-parameters (one preset = one of these)."""

    slab: int = 1
    resnet_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    resnet_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    dim: int = 64
    spatial_depth: int = 2
    temporal_depth: int = 2
    heads: int = 4
    dim_head: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0


PRESETS = {
    "tiny": HybridArgs(),
    "base": HybridArgs(slab=4, resnet_widths=[64, 128, 256], resnet_depths=[2, 2, 2], dim=512, spatial_depth=4,
                       temporal_depth=4, heads=8, dim_head=64),
}


class BasicBlock(nn.Module):
    """ResNet basic block: ReLU(BN(conv3×3(ReLU(BN(conv3×3(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet2D(nn.Module):
    """A small 2D ResNet: (N, C, H, W) → (N, widths[-1], ⌈H/s⌉, ⌈W/s⌉), s = 4 · 2^(stages − 1)."""

    def __init__(self, in_channels: int, widths: list[int], depths: list[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, c_in = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                layers.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.stride = 4 * 2 ** (len(widths) - 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


class HybridEncoder(nn.Module):
    """Per-slab 2D ResNet → spatial transformer → temporal transformer; see the module docstring."""

    def __init__(self, args: HybridArgs, input_shape: tuple[int, int, int], attention: str, norm: str,
                 mlp: str) -> None:
        super().__init__()
        depth, height, width = input_shape
        if len(args.resnet_widths) != len(args.resnet_depths):
            raise ConfigError(f"model.encoder_args: hybrid needs one resnet width per stage, got "
                              f"resnet_widths={args.resnet_widths}, resnet_depths={args.resnet_depths}")
        if depth % args.slab:
            raise ConfigError(f"data.target_shape {list(input_shape)}: the {depth} slices must be divisible by the "
                              f"hybrid slab {args.slab}; change data.target_shape or model.encoder_args.slab")
        self.args = args
        self.resnet = ResNet2D(args.slab, args.resnet_widths, args.resnet_depths)
        self.to_tokens = nn.Conv2d(args.resnet_widths[-1], args.dim, 1)
        stride = self.resnet.stride
        self.grid = (depth // args.slab, math.ceil(height / stride), math.ceil(width / stride))
        t, h, w = self.grid
        self.spatial_pos = nn.Parameter(torch.randn(h * w, args.dim) * 0.02)
        self.temporal_pos = nn.Parameter(torch.randn(t, args.dim) * 0.02)
        layer = dict(heads=args.heads, dim_head=args.dim_head, attention=attention, norm=norm, mlp=mlp,
                     mlp_ratio=args.mlp_ratio, dropout=args.dropout)
        self.spatial = Transformer(args.dim, args.spatial_depth, **layer)
        self.temporal = Transformer(args.dim, args.temporal_depth, **layer)
        self.out_dim = args.dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in backward instead of storing them."""
        self.spatial.grad_checkpointing = self.temporal.grad_checkpointing = enable

    def forward_slabs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → one encoded token per slab, (B, D / slab, dim)."""
        b, t, dim = x.shape[0], self.grid[0], self.args.dim
        slabs = x.reshape(b * t, self.args.slab, *x.shape[-2:])
        tokens = self.to_tokens(self.resnet(slabs)).flatten(2).transpose(1, 2)
        tokens = self.spatial(tokens + self.spatial_pos).mean(dim=1)
        return self.temporal(tokens.reshape(b, t, dim) + self.temporal_pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_slabs(x).mean(dim=1)


@register_encoder("hybrid", axes={"attention": "sdpa", "norm": "layernorm", "mlp": "gelu"})
def hybrid(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> HybridEncoder:
    """2D ResNet per slab + spatial/temporal transformers; presets ``tiny`` (CPU-sized, default) and ``base``."""
    return HybridEncoder(resolve_preset(cfg, PRESETS, "tiny"), tuple(input_shape), **resolve_axes(cfg))
