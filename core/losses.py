"""Contrastive losses by name: ``clip`` (softmax InfoNCE), ``ctclip`` (the same with CT-CLIP's temperature) and
``siglip`` (pairwise sigmoid).

Each loss owns its logit scale (in log space; learnable, or fixed at its
initial value with ``model.logit_scale_learnable: false``) and, for SigLIP,
its learnable bias. Under torch.distributed the features of all ranks are gathered with
gradient (``torch.distributed.nn.all_gather``), so the contrastive batch is
the global batch and, once DDP averages gradients, training matches one
process on that batch exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn
from torch import nn
from torch.nn import functional as F

from core.registry import LOSSES, ConfigError

MAX_LOG_SCALE = math.log(100.0)  # CLIP's cap on the logit scale


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """Shared parts: the learnable log-scale and the cross-rank gather."""

    default_log_scale: float = 0.0

    def __init__(self, logit_scale_init: float | None = None, logit_bias_init: float | None = None,
                 logit_scale_learnable: bool = True) -> None:
        super().__init__()
        if logit_bias_init is not None and not hasattr(self, "default_log_bias"):
            raise ConfigError(
                f"model.logit_bias_init: loss '{type(self).__name__}' has no bias; use model.loss=siglip or drop it"
            )
        init = torch.tensor(float(self.default_log_scale if logit_scale_init is None else logit_scale_init))
        if logit_scale_learnable:
            self.logit_scale = nn.Parameter(init)
        else:  # a fixed temperature (DCFormer's e): a buffer, so no adaptation or optimizer can train it
            self.register_buffer("logit_scale", init)

    def scale(self) -> torch.Tensor:
        """e^{logit_scale}, capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOG_SCALE).exp()

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Scaled image×text similarities of the global batch, (N, N)."""
        return self.scale() * gather_features(image_emb) @ gather_features(text_emb).t()

    def state_metrics(self) -> dict[str, float]:
        """The learnable temperature parameters, for logging."""
        return {"logit_scale": float(self.scale().detach())}


@LOSSES.register("clip")
class ClipLoss(ContrastiveLoss):
    """Mean of the image→text and text→image cross-entropies over the batch's similarity matrix."""

    default_log_scale = math.log(1 / 0.07)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image_emb, text_emb)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@LOSSES.register("ctclip")
class CTClipLoss(ClipLoss):
    """CT-CLIP's loss: the same two cross-entropies with its ``temperature`` — log-scale init 1.0, used as exp(),
    never clamped (a converted CT-CLIP checkpoint's ``temperature`` loads into ``logit_scale``)."""

    default_log_scale = 1.0

    def scale(self) -> torch.Tensor:
        """e^{logit_scale}, unclamped as in CT-CLIP."""
        return self.logit_scale.exp()


@LOSSES.register("siglip")
class SigLipLoss(ContrastiveLoss):
    """−Σᵢⱼ log σ(zᵢⱼ(s·xᵢ·yⱼ + b)) / N, z = +1 for matching pairs, −1 otherwise (Zhai et al. 2023)."""

    default_log_scale = math.log(10.0)
    default_log_bias = -10.0

    def __init__(self, logit_scale_init: float | None = None, logit_bias_init: float | None = None,
                 logit_scale_learnable: bool = True) -> None:
        super().__init__(logit_scale_init, logit_bias_init, logit_scale_learnable)
        bias = self.default_log_bias if logit_bias_init is None else logit_bias_init
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image_emb, text_emb) + self.logit_bias
        signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]

    def state_metrics(self) -> dict[str, float]:
        return {**super().state_metrics(), "logit_bias": float(self.logit_bias.detach())}


def create_loss(
    name: str, logit_scale_init: float | None = None, logit_bias_init: float | None = None,
    logit_scale_learnable: bool = True,
) -> ContrastiveLoss:
    """Build the loss registered as ``name`` with optional log-scale / bias initial values.

    ``logit_scale_learnable=False`` holds the scale at its initial value (a buffer, never trained).
    """
    return LOSSES.get(name)(logit_scale_init, logit_bias_init, logit_scale_learnable)
