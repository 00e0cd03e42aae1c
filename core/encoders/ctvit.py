"""CT-ViT, CT-CLIP's image encoder exactly as its public code builds it (``transformer_maskgit/ctvit.py``).

A volume (B, 1, D, H, W) is cut into patches of ``temporal_patch`` slices ×
``patch`` × ``patch`` pixels, giving a (t, h, w) grid of tokens (24 × 24 × 24
at CT-CLIP's 240 × 480 × 480). The spatial transformer attends within each
slab (h·w tokens), the temporal transformer along each token column (t
tokens); both are CT-CLIP's (``core.layers.factorized``): a PEG before every
attention, q from the normed input and k, v from the un-normed one, l2
qk-norm × learned scales at scale 8, bias-less output projections and norms,
a GEGLU feed-forward of width int(4 · 2/3 · dim) without biases. The spatial
attention adds a continuous position bias over the (h, w) grid. The encoded
tokens are then vector-quantised (cosine, 8192 codes; ``core.layers.vq``).
``pool: ctclip`` reproduces CT-CLIP's embedding — mean over slabs, then the
h·w·dim spatial tokens flattened (294,912 values at the CT-CLIP preset) for
the bias-free latent projection; ``pool: mean`` averages all tokens.

Switches (``model.encoder_args``), CT-CLIP's values first: ``position_bias:
cpb | none``, ``peg: true | false``, ``qk_norm: true | false`` (false: plain
softmax(QKᵀ/√d)), ``codebook_size: 8192`` (0: no quantisation). The seed
paper's variants are ``position_bias: none`` (flash-attn cannot add a bias;
``attention: flash`` with ``cpb`` is a config error).

Patch embedding (CT-CLIP's): norm over each patch's pt·p·p voxels → Linear →
norm over ``dim``. ``patch_embed: linear`` computes it as written, on a copy of
the volume cut into patch vectors (the norm keeps that copy for backward and
the Linear one more). ``patch_embed: conv`` computes the same map with the
same parameters without cutting the volume up: each patch's mean and variance
are reduced in place over a strided view, the volume is normalised in its own
layout, and a Conv3d with kernel = stride = patch and weight = Linear weight ×
norm gain (bias = Linear bias + Linear weight · norm bias) projects it, in
the input's precision (fp32) also under autocast. It keeps one normalised
volume for backward instead of two volume copies (fp32 + bf16 under autocast).
Under ``model.grad_checkpointing`` the patch embedding is recomputed in
backward too, so it keeps nothing but the input.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.layers.factorized import ContinuousPositionBias, FactorizedTransformer
from core.layers.norm import create_norm
from core.layers.vq import VectorQuantizer
from core.registry import ConfigError


@dataclass
class CTViTArgs:
    """CT-ViT hyper-parameters (one preset = one of these)."""

    dim: int = 512
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    patch: int = 20
    temporal_patch: int = 10
    pool: Literal["ctclip", "mean"] = "ctclip"
    patch_embed: Literal["linear", "conv"] = "linear"
    mlp_ratio: float = 4.0  # CT-CLIP's ff_mult: feed-forward width int(mlp_ratio · 2/3 · dim)
    dropout: float = 0.0
    position_bias: Literal["cpb", "none"] = "cpb"
    peg: bool = True
    qk_norm: bool = True
    codebook_size: int = 8192  # 0 = no vector quantisation


PRESETS = {
    "ctclip": CTViTArgs(),
    "tiny": CTViTArgs(dim=64, spatial_depth=2, temporal_depth=2, heads=4, dim_head=16, patch=8, temporal_patch=4,
                      codebook_size=512),
}


def position_bias_conflict(attention: str, position_bias: str) -> str | None:
    """Why a kernel cannot run this position bias (flash-attn takes no additive bias), or None."""
    if attention == "flash" and position_bias == "cpb":
        return ("model.attention=flash cannot add CT-ViT's continuous position bias; set "
                "model.encoder_args.position_bias=none (what the seed paper does) or use attention sdpa / standard")
    return None


class CTViT(nn.Module):
    """CT-ViT over a fixed input shape (D, H, W); see the module docstring."""

    def __init__(self, args: CTViTArgs, input_shape: tuple[int, int, int], attention: str, norm: str, mlp: str) -> None:
        super().__init__()
        depth, height, width = input_shape
        if depth % args.temporal_patch or height % args.patch or width % args.patch:
            raise ConfigError(
                f"data.target_shape {list(input_shape)} must be divisible by the CT-ViT patch "
                f"({args.temporal_patch}, {args.patch}, {args.patch}); change data.target_shape or model.encoder_args"
            )
        self.args = args
        self.grid = (depth // args.temporal_patch, height // args.patch, width // args.patch)
        patch_dim = args.temporal_patch * args.patch * args.patch
        self.patch_norm_in = create_norm(norm, patch_dim)
        self.patch_proj = nn.Linear(patch_dim, args.dim)
        self.patch_norm_out = create_norm(norm, args.dim)
        if reason := position_bias_conflict(attention, args.position_bias):
            raise ConfigError(reason)
        if args.codebook_size < 0:
            raise ConfigError(f"model.encoder_args.codebook_size: {args.codebook_size} must be >= 0 "
                              "(0: no quantisation)")
        t, h, w = self.grid
        self.position_bias = ContinuousPositionBias(args.dim, args.heads) if args.position_bias == "cpb" else None
        layer = dict(heads=args.heads, dim_head=args.dim_head, attention=attention, norm=norm, mlp=mlp,
                     hidden=int(args.mlp_ratio * (2 / 3) * args.dim), peg=args.peg, qk_norm=args.qk_norm,
                     dropout=args.dropout)
        self.spatial = FactorizedTransformer(args.dim, args.spatial_depth, **layer)
        self.temporal = FactorizedTransformer(args.dim, args.temporal_depth, **layer)
        self.vq = VectorQuantizer(args.dim, args.codebook_size) if args.codebook_size else None
        self.out_dim = h * w * args.dim if args.pool == "ctclip" else args.dim
        self.grad_checkpointing = False
        if args.patch_embed == "conv":
            patch_norm_centre(self.patch_norm_in)  # fails at build time for a norm the conv path cannot fold

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the patch embedding's and each transformer block's activations in backward
        instead of storing them."""
        self.grad_checkpointing = self.spatial.grad_checkpointing = self.temporal.grad_checkpointing = enable

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → (B, t, h, w, pt·p·p) patch vectors."""
        b = x.shape[0]
        (t, h, w), pt, p = self.grid, self.args.temporal_patch, self.args.patch
        x = x.reshape(b, t, pt, h, p, w, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, t, h, w, pt * p * p)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → patch tokens (B, t, h, w, dim): norm → projection → norm, per ``patch_embed``."""
        if self.args.patch_embed == "conv":
            return self.patch_norm_out(self.conv_project(x))
        return self.patch_norm_out(self.patch_proj(self.patch_norm_in(self.patchify(x))))

    def conv_project(self, x: torch.Tensor) -> torch.Tensor:
        """``patch_proj(patch_norm_in(patchify(x)))`` computed as a strided Conv3d on the normalised volume."""
        b = x.shape[0]
        (t, h, w), pt, p = self.grid, self.args.temporal_patch, self.args.patch
        blocks = x.reshape(b, t, pt, h, p, w, p)  # a view: one patch's voxels along dims 2, 4, 6
        norm, proj, voxels = self.patch_norm_in, self.patch_proj, (2, 4, 6)
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        if patch_norm_centre(norm):
            var, mean = torch.var_mean(blocks, dim=voxels, correction=0, keepdim=True)
            normed = (blocks - mean) * torch.rsqrt(var + eps)
        else:
            sumsq = torch.linalg.vector_norm(blocks, dim=voxels, keepdim=True).square()
            normed = blocks * torch.rsqrt(sumsq / (pt * p * p) + eps)
        weight, bias = proj.weight, proj.bias
        if norm.weight is not None:
            weight = weight * norm.weight
        if getattr(norm, "bias", None) is not None:
            bias = F.linear(norm.bias, proj.weight, bias)
        # In the input's precision even under autocast: the normed volume is made in it anyway, so a half copy
        # would add memory, not save it, and CPU bf16 conv3d kernels are several times slower than fp32 ones.
        off = x.device.type if torch.amp.is_autocast_available(x.device.type) else None
        with torch.autocast(off, enabled=False) if off else nullcontext():
            out = F.conv3d(normed.reshape(x.shape), weight.to(normed.dtype).view(-1, 1, pt, p, p),
                           bias.to(normed.dtype), stride=(pt, p, p))
        return out.permute(0, 2, 3, 4, 1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → encoded, quantised tokens (B, t, h, w, dim) (CT-CLIP's ``return_encoded_tokens``)."""
        b, dim = x.shape[0], self.args.dim
        t, h, w = self.grid
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            tokens = checkpoint(self.embed_patches, x, use_reentrant=False)
        else:
            tokens = self.embed_patches(x)
        grid_shape = (b, t, h, w)
        bias = self.position_bias(h, w) if self.position_bias is not None else None
        tokens = self.spatial(tokens.reshape(b * t, h * w, dim), grid_shape, bias)
        tokens = tokens.reshape(b, t, h * w, dim).transpose(1, 2).reshape(b * h * w, t, dim)
        tokens = self.temporal(tokens, grid_shape)
        tokens = tokens.reshape(b, h, w, t, dim).permute(0, 3, 1, 2, 4)
        if self.vq is not None:  # CT-CLIP keeps the quantised tokens and drops the commitment loss
            tokens = self.vq(tokens.reshape(b, t * h * w, dim))[0].view(b, t, h, w, dim)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        if self.args.pool == "ctclip":
            return tokens.mean(dim=1).flatten(1)
        return tokens.mean(dim=(1, 2, 3))


def patch_norm_centre(norm: nn.Module) -> bool:
    """Whether the patch pre-norm centres (LayerNorm) or only scales (RMSNorm): what ``patch_embed: conv`` folds."""
    for kind, centre in _FOLDABLE_NORMS.items():
        if isinstance(norm, kind):
            return centre
    raise ConfigError(f"model.encoder_args.patch_embed=conv folds a LayerNorm or RMSNorm patch pre-norm, not "
                      f"{type(norm).__name__}; use patch_embed: linear with this norm")


_FOLDABLE_NORMS: dict[type[nn.Module], bool] = {nn.LayerNorm: True, nn.RMSNorm: False}


def ctvit_conflicts(cfg: ModelConfig, axes: dict[str, str]) -> list[str]:
    """Choices this encoder cannot combine (a matrix lists such a cell as skipped with the reason)."""
    args = resolve_preset(cfg, PRESETS, "ctclip")
    return [reason] if (reason := position_bias_conflict(axes["attention"], args.position_bias)) else []


@register_encoder("ctvit", axes={"attention": "sdpa", "norm": "layernorm", "mlp": "geglu"}, conflicts=ctvit_conflicts)
def ctvit(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> CTViT:
    """CT-CLIP's CT-ViT; presets ``ctclip`` (the paper's, default) and ``tiny`` (the same network, CPU-sized)."""
    return CTViT(resolve_preset(cfg, PRESETS, "ctclip"), input_shape, **resolve_axes(cfg))
