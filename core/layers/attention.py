"""Multi-head self-attention with a swappable kernel: ``standard``, ``sdpa``, ``flash``.

All three compute softmax(QKᵀ·scale + bias)V (scale 1/√d unless given; an
optional additive float bias, broadcast over the batch, e.g. CT-ViT's
continuous position bias) over the same projections; they differ only in how:
``standard`` materialises the (L × L) attention matrix (the CT-CLIP
baseline), ``sdpa`` calls torch's fused ``scaled_dot_product_attention``, and
``flash`` calls the flash-attn package (CUDA, fp16/bf16 only), which takes no
additive bias: a bias there is an error.

With a bias, ``sdpa`` passes it as a float ``attn_mask``: torch's math and
memory-efficient backends (and cuDNN on recent GPUs) accept it; its flash
backend does not, so the dispatcher skips it.

``sdpa`` picks its backend itself unless ``model.sdpa_backend`` names one
(``set_sdpa_backend``): ``flash`` (FlashAttention-2 inside torch; on CPU torch's
own flash kernel), ``efficient`` (memory-efficient, CUDA), ``cudnn`` (cuDNN,
CUDA) or ``math`` (the explicit product, any device). The choice is applied
with ``torch.nn.attention.sdpa_kernel`` around the call; ``auto`` leaves
torch's dispatcher alone. The other kernels ignore it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.registry import ATTENTION, ConfigError, closest

Kernel = Callable[..., torch.Tensor]  # (q, k, v, bias=None, scale=None) -> out

# model.sdpa_backend → torch backend (None = torch's own choice).
SDPA_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# Backends torch implements per device type; on CUDA each also has dtype / head-size limits of its own.
SDPA_DEVICE_BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": ("auto", "flash", "math"),
    "cuda": tuple(SDPA_BACKENDS),
}


@ATTENTION.register("standard")
def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Explicit softmax(QKᵀ·scale + bias)V on (batch, heads, tokens, dim_head) tensors."""
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


@ATTENTION.register("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """torch's fused scaled-dot-product attention (flash / memory-efficient / math backend); a bias goes in as a
    float ``attn_mask``."""
    if bias is not None:
        bias = bias.to(q.dtype).expand(q.shape[0], *bias.shape[-3:])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def flash_unavailable_reason() -> str | None:
    """Why the ``flash`` kernel cannot run here, or None when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install -r requirements-gpu.txt)"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU and none is available"
    return None


@ATTENTION.register("flash")
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """FlashAttention (Dao et al.) via flash-attn; inputs are cast to bf16 unless already half. No additive bias."""
    from flash_attn import flash_attn_func

    if bias is not None:
        raise ConfigError("model.attention=flash cannot add an attention bias; set model.encoder_args.position_bias"
                          "=none (as the seed paper does) or use model.attention=sdpa / standard")
    if not q.is_cuda:
        raise RuntimeError("attention 'flash' got CPU tensors; use model.attention=sdpa on CPU")
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_func(*(t.transpose(1, 2).to(dtype) for t in (q, k, v)), softmax_scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def check_sdpa_backend(backend: str) -> SDPBackend | None:
    """The torch backend named by ``model.sdpa_backend``; a ConfigError naming the closest choice otherwise."""
    if backend not in SDPA_BACKENDS:
        raise ConfigError(f"model.sdpa_backend: unknown backend '{backend}'{closest(backend, list(SDPA_BACKENDS))} "
                          f"(choices: {', '.join(SDPA_BACKENDS)})")
    return SDPA_BACKENDS[backend]


class KernelAttention(nn.Module):
    """What every attention layer shares: its kernel by name and the ``sdpa`` backend choice."""

    def __init__(self, heads: int, dim_head: int, kernel: Kernel, name: str) -> None:
        super().__init__()
        self.heads, self.dim_head, self.kernel_name = heads, dim_head, name
        self.kernel = kernel
        self.sdpa_backend = "auto"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Run the kernel on (batch, heads, tokens, dim_head) tensors inside the chosen ``sdpa`` backend."""
        if bias is not None and self.kernel_name == "sdpa" and self.sdpa_backend == "flash":
            raise ConfigError("model.sdpa_backend=flash takes no attention bias; use sdpa_backend auto, math or "
                              "efficient, or model.encoder_args.position_bias=none")
        with self._backend_scope(q.device.type):
            return self.kernel(q, k, v, bias=bias, scale=scale)

    def _backend_scope(self, device_type: str) -> AbstractContextManager:
        """``sdpa_kernel(backend)`` for an ``sdpa`` kernel with a chosen backend on CPU or CUDA; a no-op otherwise
        (the meta device of FLOP counting runs every backend as its math)."""
        if self.kernel_name != "sdpa" or self.sdpa_backend == "auto" or device_type not in SDPA_DEVICE_BACKENDS:
            return nullcontext()
        if self.sdpa_backend not in SDPA_DEVICE_BACKENDS[device_type]:
            usable = ", ".join(SDPA_DEVICE_BACKENDS[device_type])
            raise RuntimeError(f"model.sdpa_backend={self.sdpa_backend} has no {device_type} kernel in torch; "
                               f"use one of: {usable}")
        return sdpa_kernel(SDPA_BACKENDS[self.sdpa_backend])

    def extra_repr(self) -> str:
        backend = f", sdpa_backend={self.sdpa_backend}" if self.kernel_name == "sdpa" else ""
        return f"kernel={self.kernel_name}{backend}, heads={self.heads}, dim_head={self.dim_head}"


class MultiHeadAttention(KernelAttention):
    """Self-attention: fused qkv projection → kernel → output projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, kernel: Kernel, name: str) -> None:
        super().__init__(heads, dim_head, kernel, name)
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head))


def set_sdpa_backend(module: nn.Module, backend: str) -> int:
    """Make every ``sdpa`` attention inside ``module`` run on ``backend`` (a ``model.sdpa_backend`` value).

    Returns how many attention layers took it (layers with other kernels ignore it).
    """
    check_sdpa_backend(backend)
    layers = [m for m in module.modules() if isinstance(m, KernelAttention)]
    for layer in layers:
        layer.sdpa_backend = backend
    return sum(layer.kernel_name == "sdpa" for layer in layers)


def attention_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; ``flash`` fails here, before any training, when flash-attn or CUDA is
    missing, naming ``sdpa`` as the way out."""
    kernel = ATTENTION.get(name)
    if name == "flash" and (reason := flash_unavailable_reason()):
        raise ConfigError(
            f"model.attention=flash: {reason}; use model.attention=sdpa instead (same math, runs everywhere)"
        )
    return kernel


def create_attention(name: str, dim: int, heads: int = 8, dim_head: int = 64) -> MultiHeadAttention:
    """Build self-attention over ``dim``-wide tokens with the kernel registered as ``name`` (see
    ``attention_kernel``)."""
    return MultiHeadAttention(dim, heads, dim_head, attention_kernel(name), name)
