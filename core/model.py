"""The CLIP model: image encoder + text encoder + bias-free projections into one latent space."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from core.config import Config
from core.encoders import create_encoder
from core.losses import create_loss
from core.text import create_text_encoder


class CLIPModel(nn.Module):
    """Embeds volumes and reports into a shared, L2-normalised latent space and scores them with the loss."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, loss: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.visual_proj = nn.Linear(image_encoder.out_dim, latent_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.out_dim, latent_dim, bias=False)
        self.loss = loss

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise report texts with the text encoder's tokenizer."""
        return self.text_encoder.tokenize(texts)

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) volumes → (B, latent) unit vectors."""
        return F.normalize(self.visual_proj(self.image_encoder(volumes)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids → (B, latent) unit vectors."""
        return self.project_text(self.text_encoder(input_ids, attention_mask))

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower features (e.g. cached ones of a frozen tower) → (B, latent) unit vectors."""
        return F.normalize(self.text_proj(features), dim=-1)

    def forward(
        self, volumes: torch.Tensor, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Contrastive loss of a batch of matching (volume, report) pairs, with both embeddings.

        Reports come as tokens, or as ``text_features`` a frozen text tower computed beforehand.
        """
        image_emb = self.encode_image(volumes)
        if text_features is not None:
            text_emb = self.project_text(text_features)
        else:
            text_emb = self.encode_text(input_ids, attention_mask)
        return {"loss": self.loss(image_emb, text_emb), "image_emb": image_emb, "text_emb": text_emb}


def build_model(cfg: Config) -> CLIPModel:
    """Build the CLIP model a run config describes (adaptation such as LoRA is applied by the caller)."""
    m = cfg.model
    image_encoder = create_encoder(m, tuple(cfg.data.target_shape))
    if m.grad_checkpointing and hasattr(image_encoder, "set_grad_checkpointing"):
        image_encoder.set_grad_checkpointing(True)
    text_encoder = create_text_encoder(m.text_encoder, m.text_pool, m.text_max_length, m.text_unit)
    loss = create_loss(m.loss, m.logit_scale_init, m.logit_bias_init, m.logit_scale_learnable)
    return CLIPModel(image_encoder, text_encoder, loss, m.latent_dim)


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts of ``module``."""
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}
