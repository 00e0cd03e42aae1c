"""Vector quantisation of tokens, as CT-CLIP's CT-ViT does it before pooling.

CT-CLIP builds ``VectorQuantize(dim, codebook_size, use_cosine_sim=True)``
from vector-quantize-pytorch 1.1.2 (the version its ``setup.py`` pins); this
module is that configuration's arithmetic, step for step:

- search: each token and each codebook row is l2-normalised, the nearest row
  is the one of highest cosine similarity;
- output: the raw codebook row (not its normalised copy); in training with
  a straight-through gradient, ``x + (q − x).detach()``, so the encoder's
  gradient passes unchanged;
- codebook update in training (no gradient): EMA with decay 0.8 of the
  l2-normalised mean of the normalised tokens each code won; a row that won
  nothing moves toward its own unit-normalised copy (it stays once it is
  unit-norm, as at init; a trained CT-CLIP codebook is not); no dead-code
  replacement, no k-means init;
- under DDP the EMA statistics (how many tokens each code won, their sum)
  are summed over ranks before the update, as the package's
  ``sync_codebook=True`` does, so every rank applies the update the global
  batch gives and a run on N ranks equals one process on the same global
  batch (CT-CLIP's own DDP runs leave it off and keep rank 0's update);
- aux loss: the commitment loss mse(q.detach(), x) × 1.0 in training, 0 in
  eval. CT-CLIP's contrastive training never adds it to its loss (it asks
  the encoder for the quantised tokens only); ``CTViT`` does the same.

The package's current releases (1.2x–1.3x) change that behaviour even when
configured the same way: the search uses the raw, not normalised, codebook
rows (a trained CT-CLIP codebook is not unit-norm, so codes change), the
straight-through gradient passes through the input's l2-norm, the rotation
trick is on by default and the EMA keeps a separate running sum. Hence the
arithmetic is written out here; ``tests/fixtures/ctclip`` checks it against
vector-quantize-pytorch 1.1.2 itself: the codes CT-CLIP's encoder picks, and
one training step (``vq_train.pt``: output, commitment loss, gradient, EMA).
"""

from __future__ import annotations

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ with an EMA codebook: (B, N, dim) → (quantised (B, N, dim), indices (B, N), aux loss)."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.8, commitment_weight: float = 1.0) -> None:
        super().__init__()
        self.decay, self.commitment_weight = decay, commitment_weight
        embed = torch.empty(codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("embed", F.normalize(embed, dim=-1))

    @property
    def codebook_size(self) -> int:
        return self.embed.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = F.normalize(x.float().reshape(-1, x.shape[-1]), dim=-1)
        embed = F.normalize(self.embed, dim=-1)
        indices = (flat @ embed.t()).argmax(dim=-1)
        quantized = self.embed[indices].view(x.shape).to(x.dtype)
        aux = x.new_zeros(())
        if self.training:
            self._ema_update(flat.detach(), indices, embed)
            quantized = x + (quantized - x).detach()
            if self.commitment_weight > 0:
                aux = F.mse_loss(quantized.detach(), x) * self.commitment_weight
        return quantized, indices.view(x.shape[:-1]), aux

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, embed: torch.Tensor) -> None:
        """Move each winning row toward the normalised mean of its tokens, every other row toward its unit-normalised
        copy, on every rank (decay ``self.decay``)."""
        bins = flat.new_zeros(self.codebook_size).index_add_(0, indices, flat.new_ones(indices.shape))
        sums = torch.zeros_like(embed).index_add_(0, indices, flat)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bins)
            dist.all_reduce(sums)
        means = F.normalize(sums / bins.clamp(min=1.0)[:, None], dim=-1)
        target = torch.where((bins == 0)[:, None], embed, means)
        self.embed.lerp_(target.to(self.embed.dtype), 1 - self.decay)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.embed.shape[1]}, cosine, ema decay={self.decay}"
