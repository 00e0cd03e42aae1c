"""Multi-head self-attention with a swappable kernel: ``standard``, ``sdpa``, ``flash``.

All three compute softmax(QKᵀ/√d)V over the same projections; they differ only
in how: ``standard`` materialises the (L × L) attention matrix (the CT-CLIP
baseline), ``sdpa`` calls torch's fused ``scaled_dot_product_attention``, and
``flash`` calls the flash-attn package (CUDA, fp16/bf16 only).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from core.registry import ATTENTION, ConfigError

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@ATTENTION.register("standard")
def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(QKᵀ/√d)V on (batch, heads, tokens, dim_head) tensors."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(dim=-1) @ v


@ATTENTION.register("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused scaled-dot-product attention (flash / memory-efficient / math backend)."""
    return F.scaled_dot_product_attention(q, k, v)


def flash_unavailable_reason() -> str | None:
    """Why the ``flash`` kernel cannot run here, or None when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install -r requirements-gpu.txt)"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU and none is available"
    return None


@ATTENTION.register("flash")
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention (Dao et al.) via flash-attn; inputs are cast to bf16 unless already half."""
    from flash_attn import flash_attn_func

    if not q.is_cuda:
        raise RuntimeError("attention 'flash' got CPU tensors; use model.attention=sdpa on CPU")
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention: fused qkv projection → kernel → output projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, kernel: Kernel, name: str) -> None:
        super().__init__()
        self.heads, self.dim_head, self.kernel_name = heads, dim_head, name
        self.kernel = kernel
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = self.kernel(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_name}, heads={self.heads}, dim_head={self.dim_head}"


def create_attention(name: str, dim: int, heads: int = 8, dim_head: int = 64) -> MultiHeadAttention:
    """Build self-attention over ``dim``-wide tokens with the kernel registered as ``name``.

    ``flash`` fails here, before any training, when flash-attn or CUDA is missing.
    """
    kernel = ATTENTION.get(name)
    if name == "flash" and (reason := flash_unavailable_reason()):
        raise ConfigError(
            f"model.attention=flash: {reason}; use model.attention=sdpa instead (same math, runs everywhere)"
        )
    return MultiHeadAttention(dim, heads, dim_head, kernel, name)
