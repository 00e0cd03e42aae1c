"""Normalisation layers by name: ``layernorm`` (the CT-CLIP baseline) and ``rmsnorm``."""

from __future__ import annotations

from torch import nn

from core.registry import NORM


@NORM.register("layernorm")
def layernorm(dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm: centre and scale each token, with a learned gain and bias."""
    return nn.LayerNorm(dim, eps=eps)


@NORM.register("rmsnorm")
def rmsnorm(dim: int, eps: float = 1e-6) -> nn.Module:
    """RMSNorm: x / sqrt(mean(x²) + eps) · g — no centring, no bias (cheaper than LayerNorm)."""
    return nn.RMSNorm(dim, eps=eps)


def create_norm(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the norm registered as ``name`` over the last dimension ``dim``."""
    return NORM.get(name)(dim, **kwargs)
