"""AdamW with decoupled weight decay on weight matrices only, and a warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.config import TrainConfig


def create_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases, norm gains and the loss's scale/bias get no weight decay.

    This follows open_clip: decaying a temperature or a LayerNorm gain only fights the model.
    The text tower's parameters run at ``lr × text_lr_scale``, so a pretrained
    tower can be fine-tuned gently beside an image encoder trained from scratch.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}  # (no decay, own text lr) → parameters
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.startswith("loss.")
        text = cfg.text_lr_scale != 1.0 and "text_encoder" in name.split(".")
        groups.setdefault((no_decay, text), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
          "lr": cfg.lr * (cfg.text_lr_scale if text else 1.0)}
         for (no_decay, text), params in sorted(groups.items())],
        lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda",
    )


class WarmupCosine:
    """lr multiplier: linear from 0 to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, cosine: bool = True) -> None:
        self.warmup, self.total, self.min_ratio, self.cosine = warmup, max(total, 1), min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-optimizer-step learning-rate schedule named by ``cfg.schedule``."""
    schedule = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cosine=cfg.schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
