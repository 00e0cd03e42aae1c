"""CT-CLIP's transformer parts (``transformer_maskgit/attention.py``), with swappable kernel, norm and MLP.

- ``PEG``: position generator, a depthwise Conv3d (k3) over the token grid with
  a causal pad along the first grid axis, added before every attention.
- ``ContinuousPositionBias``: an MLP 2 → dim → dim → heads (LeakyReLU 0.1) on
  sign·log(|Δ|+1) of the 2D grid offsets, added to the attention scores.
- ``QKNormAttention``: a bias-less norm on the query path only — q comes from
  the normed input, k and v from the un-normed input (CT-CLIP's quirk; its
  checkpoint depends on it) — per-head l2 qk-norm × learned ``q_scale`` /
  ``k_scale``, fixed scale 8, output projection without bias. With
  ``qk_norm=False`` it is plain scaled dot-product attention (scale 1/√d).
- ``FactorizedBlock``: x + PEG(x), x + Attn(x), x + MLP(Norm(x)); the MLP
  without biases at CT-CLIP's width.
- ``FactorizedTransformer``: blocks + a bias-less output norm.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from core.layers.attention import KernelAttention, attention_kernel
from core.layers.mlp import create_mlp
from core.layers.norm import create_norm

CTCLIP_ATTN_SCALE = 8.0  # CT-CLIP's fixed logit scale on l2-normed q, k


class PEG(nn.Module):
    """Depthwise Conv3d (k3) over the (t, h, w) token grid, zero pad 2 before / 0 after on t, 1/1 on h and w.

    ``x`` (N, L, dim) is reshaped to ``grid_shape`` + (dim,) as it lies in
    memory — exactly CT-CLIP's ``x.reshape(*shape, -1)``. In the spatial stack
    that is the true grid; in the temporal stack, whose tokens are ordered
    (b h w, t), it is not, and CT-CLIP's weights were trained on that order.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int, int, int]) -> torch.Tensor:
        out = x.reshape(*grid_shape, x.shape[-1]).permute(0, 4, 1, 2, 3)
        out = self.conv(F.pad(out, (1, 1, 1, 1, 2, 0)))
        return out.permute(0, 2, 3, 4, 1).reshape(x.shape)


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias (heads, h·w, h·w) from the 2D grid offsets (Liu et al. 2021, SwinV2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim), nn.LeakyReLU(0.1),
                                 nn.Linear(dim, heads))

    def forward(self, height: int, width: int) -> torch.Tensor:
        device = self.net[0].weight.device
        grid = torch.stack(torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                          indexing="ij")).flatten(1).t()
        rel = (grid[:, None, :] - grid[None, :, :]).float()
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        return self.net(rel.to(self.net[0].weight.dtype)).permute(2, 0, 1)


class QKNormAttention(KernelAttention):
    """CT-CLIP's self-attention (see the module docstring); ``bias`` (heads, L, L) is added to the scores."""

    def __init__(self, dim: int, heads: int, dim_head: int, attention: str, norm: str, qk_norm: bool = True) -> None:
        super().__init__(heads, dim_head, attention_kernel(attention), attention)
        inner = heads * dim_head
        self.norm = create_norm(norm, dim, bias=False)
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(dim, 2 * inner, bias=False)
        self.proj = nn.Linear(inner, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(self.norm(x)).view(batch, tokens, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.kv(x).view(batch, tokens, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        scale = None
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1) * self.q_scale, F.normalize(k, dim=-1) * self.k_scale
            scale = CTCLIP_ATTN_SCALE
        out = self.attend(q, k, v, bias=bias, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head))


class FactorizedBlock(nn.Module):
    """x + PEG(x) (optional), x + Attn(x, bias), x + MLP(Norm(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, attention: str, norm: str, mlp: str, hidden: int,
                 peg: bool = True, qk_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.peg = PEG(dim) if peg else None
        self.attn = QKNormAttention(dim, heads, dim_head, attention, norm, qk_norm)
        self.ff_norm = create_norm(norm, dim)
        self.mlp = create_mlp(mlp, dim, dropout=dropout, hidden=hidden, bias=False)

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int, int, int],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.peg is not None:
            x = self.peg(x, grid_shape) + x
        x = self.attn(x, bias) + x
        return self.mlp(self.ff_norm(x)) + x


class FactorizedTransformer(nn.Module):
    """A stack of FactorizedBlocks and a bias-less output norm; optional activation checkpointing per block."""

    def __init__(self, dim: int, depth: int, **block: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FactorizedBlock(dim, **block) for _ in range(depth))
        self.norm = create_norm(str(block["norm"]), dim, bias=False)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int, int, int],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, grid_shape, bias, use_reentrant=False)
            else:
                x = block(x, grid_shape, bias)
        return self.norm(x)
