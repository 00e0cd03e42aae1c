"""DCFormer (Ates et al. 2025): a 3D conv net whose spatial mixing is a decomposed 3D convolution.

A k×k×k depthwise convolution is replaced by three parallel depthwise
convolutions with kernels (k,1,1), (1,k,1) and (1,1,k), each followed by its
own BatchNorm, summed — 3k weights per channel instead of k³. Layout, as in
the authors' release (github.com/mirthAI/DCFormer):

- stem: a decomposed conv with kernel 7 and stride 4 (1 → width₀ channels),
  then ``stem_convs`` dense decomposed 3×3×3 convs, with no activation in
  between (``stem_act: none``, what the authors' code computes: it passes
  ``nn.GELU()`` positionally into the ``norm`` slot of ``DecompConv3D``, which
  only switches its BatchNorms on); ``stem_act: gelu`` puts a GELU after each
  of the four, as an ablation;
- four stages; each opens with MaxPool3d(3, stride 2, pad 1) and a bias-free
  1×1×1 conv to the stage width, then its blocks
  ``x + γ · MLP(DecompConv(x))`` (depthwise decomposed conv with kernel
  13 / 11 / 9 / 7 per stage, MLP ratio 4 on channels-last tokens, layer
  scale γ initialised to 1e-6);
- global mean pool → features of the last width (total stride 64); with
  ``codebook_size > 0`` the last stage's tokens are first vector-quantised as
  DCFormer's CLIP model does (``vector_quantize_pytorch.VectorQuantize(dim,
  codebook_size, use_cosine_sim=True)``: cosine nearest code, codebook updated
  by EMA in training, gradients through the rotation trick), then mean-pooled.
  DCFormer uses 8192 codes; 0 (the default) pools the raw features.

Variants (paper notation counts the stem as stage 0):

| encoder | depths | widths | params (encoder) | paper |
|---|---|---|---|---|
| dcformer_nano | [1,1,1,1,1] | [32,32,64,128,256] | 0.79 M | 0.92 M |
| dcformer_naive | [1,2,2,2,2] | [32,64,128,256,512] | 5.85 M | 5.85 M |
| dcformer_tiny | [1,2,3,3,2] | [64,96,192,384,768] | 14.66 M | 15.1 M |

The encoder counts equal the authors' released model exactly; the paper's
nano and tiny figures match the encoder plus the bias-free projection to the
512-d CLIP latent (0.92 M, 15.05 M). The MLP is the ``mlp`` axis (GELU by
default; the gated variants keep the parameter count). The codebook is a
buffer (EMA), not a parameter. A DCFormer checkpoint loads with
``core.convert_dcformer.load_dcformer``.

Axis order: the input is (B, 1, D, H, W), as every encoder here; the authors'
encoder permutes its (B, 1, D, H, W) input to (B, 1, H, W, D) first, so their
branches c1 / c2 / c3 act on H / W / D, ours ``branches[0..2]`` on D / H / W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.config import ModelConfig
from core.encoders.base import register_encoder, resolve_axes, resolve_preset
from core.layers.mlp import create_mlp
from core.registry import ConfigError, closest


@dataclass
class DCFormerArgs:
    """DCFormer hyper-parameters: ``widths`` = [stem, stage 1..4], ``depths`` and ``kernels`` per stage."""

    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    widths: list[int] = field(default_factory=lambda: [32, 32, 64, 128, 256])
    kernels: list[int] = field(default_factory=lambda: [13, 11, 9, 7])
    stem_kernel: int = 7
    stem_stride: int = 4
    stem_convs: int = 3
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6
    stem_act: str = "none"  # "none" (the authors' code) or "gelu" (a GELU after each stem conv)
    codebook_size: int = 0  # > 0: vector-quantise the final tokens before pooling, as DCFormer (8192)


STEM_ACTS = {"none": nn.Identity, "gelu": nn.GELU}


VARIANTS = {
    "nano": DCFormerArgs(depths=[1, 1, 1, 1], widths=[32, 32, 64, 128, 256]),
    "naive": DCFormerArgs(depths=[2, 2, 2, 2], widths=[32, 64, 128, 256, 512]),
    "tiny": DCFormerArgs(depths=[2, 3, 3, 2], widths=[64, 96, 192, 384, 768]),
}


class DecomposedConv3d(nn.Module):
    """BN(Conv(k,1,1)) + BN(Conv(1,k,1)) + BN(Conv(1,1,k)): a 3D conv factorised along D, H and W.

    With ``groups = channels`` it is DCFormer's depthwise token mixer; with
    ``groups = 1`` a dense conv (the stem). Padding is k // 2 along each
    branch's kernel axis, so all three branches give the same output shape.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = kernel
            padding = [0, 0, 0]
            padding[axis] = kernel // 2
            conv = nn.Conv3d(in_channels, out_channels, tuple(shape), stride=stride, padding=tuple(padding),
                             groups=groups)
            self.branches.append(nn.Sequential(conv, nn.BatchNorm3d(out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches[0](x) + self.branches[1](x) + self.branches[2](x)


class DCFormerBlock(nn.Module):
    """x + γ · MLP(DecomposedConv3d(x)), the MLP on channels-last tokens."""

    def __init__(self, channels: int, kernel: int, mlp: str, mlp_ratio: float, layer_scale_init: float) -> None:
        super().__init__()
        self.mixer = DecomposedConv3d(channels, channels, kernel, groups=channels)
        self.mlp = create_mlp(mlp, channels, ratio=mlp_ratio)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mixer(x).permute(0, 2, 3, 4, 1)
        # Only the MLP (the 4×-wide activations) is recomputed: re-running BatchNorm would update its stats twice.
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            tokens = checkpoint(self.mlp, tokens, use_reentrant=False)
        else:
            tokens = self.mlp(tokens)
        return x + (self.gamma * tokens).permute(0, 4, 1, 2, 3)


class DCFormer(nn.Module):
    """DCFormer image encoder: (B, 1, D, H, W) → (B, widths[-1]); see the module docstring."""

    def __init__(self, args: DCFormerArgs, mlp: str) -> None:
        super().__init__()
        if not (len(args.widths) == len(args.depths) + 1 == len(args.kernels) + 1):
            raise ConfigError(
                f"model.encoder_args: DCFormer needs len(widths) = len(depths) + 1 = len(kernels) + 1 "
                f"(stem + stages), got widths={args.widths}, depths={args.depths}, kernels={args.kernels}"
            )
        if args.stem_act not in STEM_ACTS:
            raise ConfigError(f"model.encoder_args.stem_act: '{args.stem_act}' is not a stem activation"
                              f"{closest(args.stem_act, list(STEM_ACTS))} (choices: {', '.join(STEM_ACTS)})")
        if args.codebook_size < 0:
            raise ConfigError(f"model.encoder_args.codebook_size: {args.codebook_size} < 0; "
                              "use 0 (no quantisation) or a number of codes such as DCFormer's 8192")
        self.args = args
        width = args.widths[0]
        act = STEM_ACTS[args.stem_act]
        # (conv, activation) pairs: the state-dict keys are the same with either activation.
        stem = [DecomposedConv3d(1, width, args.stem_kernel, stride=args.stem_stride), act()]
        for _ in range(args.stem_convs):
            stem += [DecomposedConv3d(width, width, 3), act()]
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList()
        stage_io = zip(args.widths[:-1], args.widths[1:], strict=True)
        for depth, kernel, (c_in, c_out) in zip(args.depths, args.kernels, stage_io, strict=True):
            downsample = nn.Sequential(nn.MaxPool3d(3, stride=2, padding=1), nn.Conv3d(c_in, c_out, 1, bias=False))
            blocks = [DCFormerBlock(c_out, kernel, mlp, args.mlp_ratio, args.layer_scale_init) for _ in range(depth)]
            self.stages.append(nn.Sequential(downsample, *blocks))
        self.out_dim = args.widths[-1]
        self.vq = dcformer_vq(self.out_dim, args.codebook_size) if args.codebook_size else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's MLP activations in backward instead of storing them."""
        for module in self.modules():
            if isinstance(module, DCFormerBlock):
                module.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → the last stage's feature map (B, C, D/64, H/64, W/64)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → (B, out_dim): the mean of the (quantised, with a codebook) final tokens."""
        features = self.forward_features(x)
        if self.vq is None:
            return features.mean(dim=(2, 3, 4))
        tokens = features.flatten(2).transpose(1, 2)  # (B, D·H·W, C), DCFormer's token order
        quantised, _, _ = self.vq(tokens)  # the commitment loss is discarded, as DCFormer does
        return quantised.mean(dim=1)


def dcformer_vq(dim: int, codebook_size: int) -> nn.Module:
    """DCFormer's quantiser: ``VectorQuantize(dim, codebook_size, use_cosine_sim=True)``, all else default."""
    from vector_quantize_pytorch import VectorQuantize  # imported on use: only a quantising encoder needs it

    return VectorQuantize(dim=dim, codebook_size=codebook_size, use_cosine_sim=True)


def _build(cfg: ModelConfig, variant: str) -> DCFormer:
    return DCFormer(resolve_preset(cfg, {variant: VARIANTS[variant]}, variant), **resolve_axes(cfg))


@register_encoder("dcformer_nano", axes={"mlp": "gelu"})
def dcformer_nano(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> DCFormer:
    """DCFormer-nano, 0.79 M params (any input size; total stride 64); its one preset is ``nano``."""
    return _build(cfg, "nano")


@register_encoder("dcformer_naive", axes={"mlp": "gelu"})
def dcformer_naive(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> DCFormer:
    """DCFormer-naive, 5.85 M params; its one preset is ``naive``."""
    return _build(cfg, "naive")


@register_encoder("dcformer_tiny", axes={"mlp": "gelu"})
def dcformer_tiny(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> DCFormer:
    """DCFormer-tiny, 14.66 M params; its one preset is ``tiny``."""
    return _build(cfg, "tiny")
