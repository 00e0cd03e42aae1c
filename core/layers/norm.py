"""Normalisation layers by name: ``layernorm`` (the CT-CLIP baseline) and ``rmsnorm``."""

from __future__ import annotations

from torch import nn

from core.registry import NORM


@NORM.register("layernorm")
def layernorm(dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """LayerNorm: centre and scale each token, with a learned gain and (unless ``bias=False``) bias.

    CT-CLIP's attention and output norms are the bias-less kind (a gain only).
    """
    return nn.LayerNorm(dim, eps=eps, bias=bias)


@NORM.register("rmsnorm")
def rmsnorm(dim: int, eps: float = 1e-6, bias: bool = False) -> nn.Module:
    """RMSNorm: x / sqrt(mean(x²) + eps) · g — no centring, no bias (cheaper than LayerNorm)."""
    del bias  # RMSNorm never has one
    return nn.RMSNorm(dim, eps=eps)


def create_norm(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the norm registered as ``name`` over the last dimension ``dim``."""
    return NORM.get(name)(dim, **kwargs)
