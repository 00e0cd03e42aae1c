"""PoolFormer in 3D (Yu et al. 2022, MetaFormer): average pooling as the token mixer.

Each block is ``x + γ₁ · (AvgPool(Norm(x)) − Norm(x))`` then
``x + γ₂ · MLP(Norm(x))`` (3×3×3 pooling, stride 1, padding excluded from the
average; layer scale initialised to 1e-5). The stem is a conv with kernel 7,
stride 4, padding 2; stages are joined by a 3×3×3 stride-2 conv; a norm
follows the last stage, then the global mean pool. Norms run over the channels
of each voxel (the ``norm`` axis; the original's GroupNorm with one group also
pools over space); the MLP is the ``mlp`` axis.

Presets (parameters at 1 input channel):

- ``tiny`` (CPU-sized, default): depths [1, 1, 1], widths [16, 32, 64] — 0.12 M params.
- ``base``: PoolFormer-S12's depths [2, 2, 6, 2] and widths [64, 128, 320, 512] — 15.2 M params
  (the DCFormer paper's PoolFormer naive and tiny have 11.31 M and 20.68 M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.encoders.convnext3d import ChannelNorm, check_min_size, maybe_checkpoint
from core.layers.mlp import create_mlp
from core.layers.norm import create_norm
from core.registry import ConfigError


@dataclass
class PoolFormer3DArgs:
    """PoolFormer-3D hyper-parameters (one preset = one of these)."""

    depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    pool_size: int = 3
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5


PRESETS = {
    "tiny": PoolFormer3DArgs(),
    "base": PoolFormer3DArgs(depths=[2, 2, 6, 2], widths=[64, 128, 320, 512]),
}


class AvgPoolMixer(nn.Module):
    """k×k×k stride-1 average over the voxels inside the volume (padding is not counted).

    Written as a zero-padded sum over a count of real voxels, so it also runs on
    maps smaller than the window (where ``nn.AvgPool3d`` refuses).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = [self.size // 2, (self.size - 1) // 2] * 3
        ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
        count = F.avg_pool3d(F.pad(ones, pad), self.size, stride=1)
        return F.avg_pool3d(F.pad(x, pad), self.size, stride=1) / count


class PoolFormerBlock(nn.Module):
    """Pooling mixer then MLP, each pre-normed and layer-scaled, on a (B, C, D, H, W) map."""

    def __init__(self, channels: int, pool_size: int, norm: str, mlp: str, mlp_ratio: float,
                 layer_scale_init: float) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(norm, channels)
        self.pool = AvgPoolMixer(pool_size)
        self.norm2 = create_norm(norm, channels)
        self.mlp = create_mlp(mlp, channels, ratio=mlp_ratio)
        self.gamma1 = nn.Parameter(torch.full((channels, 1, 1, 1), layer_scale_init))
        self.gamma2 = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.gamma1 * (self.pool(normed) - normed)
        tokens = self.mlp(self.norm2(x.permute(0, 2, 3, 4, 1)))
        return x + (self.gamma2 * tokens).permute(0, 4, 1, 2, 3)


class PoolFormer3D(nn.Module):
    """PoolFormer-3D image encoder: (B, 1, D, H, W) → (B, widths[-1]); see the module docstring."""

    def __init__(self, args: PoolFormer3DArgs, input_shape: tuple[int, int, int], norm: str, mlp: str) -> None:
        super().__init__()
        if len(args.depths) != len(args.widths):
            raise ConfigError(f"model.encoder_args: PoolFormer-3D needs one width per stage, got "
                              f"depths={args.depths}, widths={args.widths}")
        check_min_size(input_shape, 3, "poolformer3d")
        self.downsamples = nn.ModuleList([nn.Conv3d(1, args.widths[0], 7, stride=4, padding=2)])
        self.downsamples.extend(nn.Conv3d(c_in, c_out, 3, stride=2, padding=1)
                                for c_in, c_out in zip(args.widths[:-1], args.widths[1:], strict=True))
        self.stages = nn.ModuleList(
            nn.Sequential(*(PoolFormerBlock(width, args.pool_size, norm, mlp, args.mlp_ratio, args.layer_scale_init)
                            for _ in range(depth)))
            for depth, width in zip(args.depths, args.widths, strict=True)
        )
        self.norm = ChannelNorm(norm, args.widths[-1])
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
        return self.norm(x).mean(dim=(2, 3, 4))


def _init_weights(module: nn.Module) -> None:
    """PoolFormer's init: truncated normal (std 0.02) for linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_encoder("poolformer3d", axes={"norm": "layernorm", "mlp": "gelu"})
def poolformer3d(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> PoolFormer3D:
    """3D PoolFormer; presets ``tiny`` (CPU-sized, 0.12 M, default) and ``base`` (S12 widths, 15.2 M)."""
    return PoolFormer3D(resolve_preset(cfg, PRESETS, "tiny"), tuple(input_shape), **resolve_axes(cfg))
