"""ConvNeXt in 3D (Liu et al. 2022): depthwise k×k×k conv → norm → MLP → layer scale, with a residual.

Layout as the 2D original, with cubes for squares: a patchify stem (conv with
kernel = stride = ``stem_patch``, then a norm), stages separated by a norm and
a 2×2×2 stride-2 conv, and a norm after the global mean pool. Norms run over
the channel dimension of channels-last tokens and are the ``norm`` axis; the
MLP is the ``mlp`` axis.

Presets (parameters at 1 input channel):

- ``tiny`` (CPU-sized, default): depths [1, 1, 1], widths [16, 32, 64], total
  stride 16 — 0.10 M params.
- ``base``: ConvNeXt-T's depths [3, 3, 9, 3] and widths [96, 192, 384, 768],
  total stride 32 — 31.3 M params (the DCFormer paper's "ConvNeXt tiny" has 31.59 M).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.layers.mlp import create_mlp
from core.layers.norm import create_norm
from core.registry import ConfigError


@dataclass
class ConvNeXt3DArgs:
    """ConvNeXt-3D hyper-parameters (one preset = one of these)."""

    depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    stem_patch: int = 4
    kernel: int = 7
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6


PRESETS = {
    "tiny": ConvNeXt3DArgs(),
    "base": ConvNeXt3DArgs(depths=[3, 3, 9, 3], widths=[96, 192, 384, 768]),
}


class ChannelNorm(nn.Module):
    """A token norm chosen by name, applied over the channels of a (B, C, D, H, W) map."""

    def __init__(self, name: str, channels: int) -> None:
        super().__init__()
        self.norm = create_norm(name, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def maybe_checkpoint(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, enable: bool) -> torch.Tensor:
    """``fn(x)``, recomputed in backward instead of stored when ``enable`` and autograd is recording."""
    if enable and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


def check_min_size(input_shape: tuple[int, int, int], stride: int, encoder: str) -> None:
    """Raise ConfigError when a volume is too small for ``stride``-fold downsampling."""
    if min(input_shape) < stride:
        raise ConfigError(
            f"data.target_shape {list(input_shape)} is too small for {encoder} (total stride {stride}): "
            f"every dimension must be >= {stride}; enlarge data.target_shape or use fewer stages in model.encoder_args"
        )


class ConvNeXtBlock(nn.Module):
    """x + γ · MLP(Norm(DWConv(x))), norm and MLP on channels-last tokens."""

    def __init__(self, channels: int, kernel: int, norm: str, mlp: str, mlp_ratio: float,
                 layer_scale_init: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = create_norm(norm, channels)
        self.mlp = create_mlp(mlp, channels, ratio=mlp_ratio)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 4, 1)))
        return x + (self.gamma * tokens).permute(0, 4, 1, 2, 3)


class ConvNeXt3D(nn.Module):
    """ConvNeXt-3D image encoder: (B, 1, D, H, W) → (B, widths[-1]); see the module docstring."""

    def __init__(self, args: ConvNeXt3DArgs, input_shape: tuple[int, int, int], norm: str, mlp: str) -> None:
        super().__init__()
        if len(args.depths) != len(args.widths):
            raise ConfigError(f"model.encoder_args: ConvNeXt-3D needs one width per stage, got depths={args.depths}, "
                              f"widths={args.widths}")
        check_min_size(input_shape, args.stem_patch * 2 ** (len(args.depths) - 1), "convnext3d")
        self.downsamples = nn.ModuleList([nn.Sequential(
            nn.Conv3d(1, args.widths[0], args.stem_patch, stride=args.stem_patch), ChannelNorm(norm, args.widths[0]))])
        for c_in, c_out in zip(args.widths[:-1], args.widths[1:], strict=True):
            self.downsamples.append(nn.Sequential(ChannelNorm(norm, c_in), nn.Conv3d(c_in, c_out, 2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(width, args.kernel, norm, mlp, args.mlp_ratio, args.layer_scale_init)
                            for _ in range(depth)))
            for depth, width in zip(args.depths, args.widths, strict=True)
        )
        self.norm = create_norm(norm, args.widths[-1])
        self.out_dim = args.widths[-1]
        self.grad_checkpointing = False
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsamples, self.stages, strict=True):
            x = downsample(x)
            for block in stage:
                x = maybe_checkpoint(block, x, self.grad_checkpointing and self.training)
        return self.norm(x.mean(dim=(2, 3, 4)))


def _init_weights(module: nn.Module) -> None:
    """ConvNeXt's init: truncated normal (std 0.02) for conv and linear weights, zero biases."""
    if isinstance(module, nn.Conv3d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_encoder("convnext3d", axes={"norm": "layernorm", "mlp": "gelu"})
def convnext3d(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> ConvNeXt3D:
    """3D ConvNeXt; presets ``tiny`` (CPU-sized, 0.10 M, default) and ``base`` (ConvNeXt-T widths, 31.3 M)."""
    return ConvNeXt3D(resolve_preset(cfg, PRESETS, "tiny"), tuple(input_shape), **resolve_axes(cfg))

