"""Linear-probe readout on frozen image embeddings: CT-CLIP's CT-LiPro classifier, fitted on cached embeddings.

What CT-CLIP does (``scripts/ct_lipro_train.py``, ``scripts/ct_lipro_inference.py``,
``scripts/src/models/utils.py::cosine_lr``, hyper-parameters in ``scripts/README.md``
"Training CT-LiPro" and ``scripts/src/args.py``):

- features: the projected, l2-normalised image latent (``CTCLIP.forward(..., return_latents=True)``'s
  ``image_latents``, 512-d), the backbone frozen (``requires_grad=False``);
- head ``ImageLatentsClassifier``: ReLU → Dropout(0.3) → Linear(latent, 18), PyTorch's default init;
- loss ``BCEWithLogitsLoss(pos_weight=...)`` with 18 hard-coded CT-RATE weights; they are the training
  split's negative/positive ratios (e.g. 9.21 → 9.8 % Medical material, 1.22 → 45 % Lung nodule);
- AdamW (weight decay 0.1), cosine schedule with linear warm-up, gradient-norm clip 1.0, batch 8,
  10 epochs; README run: lr 1e-5 with 10 000 warm-up steps, ``args.py`` defaults lr 1e-3, warm-up 500;
- inference: sigmoid of the logits in eval mode (dropout off); metrics and thresholds as for zero-shot.

Followed here: the features (``model.encode_image``, the same projected unit latent), the head, the loss
with pos_weight = negatives / positives per label computed from the training labels (``class_weight:
balanced``; a label without positives gets 1), AdamW, CT-CLIP's warm-up + cosine formula, the clip, the
batch size, the epochs, sigmoid scores, and the run's own threshold protocols and bootstrap CIs.

Deviations, each for a stated reason:

- the backbone runs once per split in eval mode under ``no_grad`` and the head trains on the cached
  embeddings (CT-CLIP re-runs its frozen backbone every step): the same features at a fraction of the cost;
- lr 1e-2 on the standardised features: the README's 1e-5 belongs to a 10-epoch run of about 50 000 steps
  on CT-RATE and moves the head too little on a small split; on synthetic-tiny embeddings 1e-2 reaches in
  1 050 steps the AUROC of scikit-learn's converged L2 logistic regression (0.632 vs 0.625–0.633), while
  ``args.py``'s 1e-3 is still short of it (0.611);
- the warm-up is a fraction of the probe's steps (0.2, CT-CLIP's 10 000 of its ≈ 50 000): 10 000 (or 500)
  steps exceed a small split's whole probe;
- at least ``min_steps`` optimizer steps (more epochs when 10 epochs are fewer): CT-CLIP's 10 epochs are
  ≈ 50 000 steps, a small split's 10 epochs too few for the head to converge;
- ``standardize`` (on by default): the ReLU output is standardised by the training set's per-feature mean
  and std before the dropout. The head's function class is unchanged (an affine map folded into the
  linear layer), only its conditioning: unit-norm latents have entries of ≈ 1/√latent, which a short
  AdamW run cannot scale up (CT-CLIP's head and lr 1e-3 on the same embeddings: AUROC 0.513);
  ``standardize: false`` with ``lr: 1e-3`` is CT-CLIP's head and optimiser exactly.

The probe reads out a trained model, so ``eval.probe`` is left out of ``config_id``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from core.config import EvalConfig, ProbeConfig
from core.data import PATHOLOGIES
from core.evaluate import _eval_mode, metric_table, predictions_frame

__all__ = ["ProbeHead", "ProbeResult", "embed_images", "positive_weights", "probe_readout", "train_probe",
           "warmup_cosine"]


class ProbeHead(nn.Module):
    """CT-CLIP's CT-LiPro head on image embeddings: ReLU → standardise → Dropout → Linear, logits out.

    ``relu=False`` drops the ReLU (a plain linear probe on the signed embedding).

    ``mean`` / ``std`` are buffers (identity until ``fit_normalization``), so
    the head is batch-size independent and saved with its state dict.
    """

    def __init__(self, in_dim: int, n_labels: int = len(PATHOLOGIES), dropout: float = 0.3, relu: bool = True) -> None:
        super().__init__()
        self.activation = nn.ReLU() if relu else nn.Identity()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, n_labels)

    @torch.no_grad()
    def fit_normalization(self, features: torch.Tensor) -> None:
        """Standardise the ReLU'd inputs with the per-feature mean and std of ``features`` (N, in_dim)."""
        active = self.activation(features)
        self.mean.copy_(active.mean(0))
        self.std.copy_(active.std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) features → (B, n_labels) logits."""
        return self.linear(self.dropout((self.activation(features) - self.mean) / self.std))


@dataclass
class ProbeResult:
    """A trained probe: its validation P(present) (N, K), ``probe_*`` metrics, per-label rows and predictions."""

    head: ProbeHead
    scores: np.ndarray
    metrics: dict[str, float]
    per_label: pd.DataFrame
    predictions: pd.DataFrame
    labels: np.ndarray = field(repr=False)
    steps: int = 0

    def write_artifacts(self, folder: str | Path) -> list[Path]:
        """Write ``probe_per_label.csv`` and ``probe_predictions.csv`` into ``folder``."""
        from core.evaluate import write_readout_tables

        return write_readout_tables(folder, "probe", self.per_label, self.predictions)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, run a block with one intra-op thread: the head's tensors are too small to gain from more, and
    on a busy machine the thread hand-offs cost about 10x the arithmetic (0.8 s vs 10 s for 1 000 steps)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int) -> float:
    """CT-CLIP's ``cosine_lr``: lr·(step+1)/warmup while warming up, then a cosine from lr to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) * base_lr


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-label negatives / positives of (N, K) 0/1 labels (CT-CLIP's pos_weight); 1 where a label has no positive."""
    positives = labels.sum(0)
    negatives = len(labels) - positives
    return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))


def train_probe(
    features_train: Any,
    labels_train: Any,
    features_valid: Any,
    labels_valid: Any,
    cfg: ProbeConfig | None = None,
    *,
    protocols: Sequence[str] = ("ctclip",),
    names: Sequence[str] = PATHOLOGIES,
    volume_names: Sequence[str] | None = None,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ProbeResult:
    """Fit the CT-LiPro head on frozen training features and score the validation features (module docstring).

    Seeded: the head's init, the batch order and the dropout masks come from
    ``seed`` (the global RNG is left as it was), so a seed gives the same
    probe. Metrics are named ``probe_auroc``, ``probe_f1``, ``probe_f1_<protocol>``,
    ``probe_auroc_ci_low`` ..., exactly as the zero-shot ones with ``zeroshot_``.
    """
    cfg = cfg or ProbeConfig()
    x_train = torch.as_tensor(features_train, dtype=torch.float32, device=device)
    y_train = torch.as_tensor(labels_train, dtype=torch.float32, device=device)
    x_valid = torch.as_tensor(features_valid, dtype=torch.float32, device=device)
    y_valid = np.asarray(labels_valid, dtype=np.float64)
    if (x_train.ndim != 2 or y_train.shape != (x_train.shape[0], len(names)) or x_valid.ndim != 2
            or x_valid.shape[1] != x_train.shape[1] or y_valid.shape != (x_valid.shape[0], len(names))):
        raise ValueError(f"probe inputs: features_train {tuple(x_train.shape)}, labels_train {tuple(y_train.shape)}, "
                         f"features_valid {tuple(x_valid.shape)} and labels_valid {y_valid.shape} must be (N, D), "
                         f"(N, {len(names)}), (M, D), (M, {len(names)})")
    if len(x_train) == 0:
        raise ValueError("probe inputs: the training split has no volumes; the probe needs labelled training scans")
    batches_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / batches_per_epoch))
    total = epochs * batches_per_epoch
    warmup = round(cfg.warmup_fraction * total)
    device = torch.device(device)
    with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
          torch.autocast(device.type, enabled=False),  # the head trains in fp32 whatever the caller's autocast
          _one_cpu_thread(device)):
        torch.manual_seed(seed)
        head = ProbeHead(x_train.shape[1], y_train.shape[1], cfg.dropout, cfg.relu).to(device)
        if cfg.standardize:
            head.fit_normalization(x_train)
        pos_weight = positive_weights(y_train) if cfg.class_weight == "balanced" else None
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        head.train()
        step = 0
        for _ in range(epochs):
            for batch in torch.randperm(len(x_train), generator=generator).split(cfg.batch_size):
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine(step, cfg.lr, warmup, total)
                batch = batch.to(device)
                loss = loss_fn(head(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
    head.eval()
    with torch.no_grad():
        scores = torch.sigmoid(head(x_valid)).cpu().double().numpy()
    metrics, per_label = metric_table(y_valid, scores, protocols, names, "probe", bootstrap, ci, seed)
    volume_names = list(volume_names) if volume_names is not None else [str(i) for i in range(len(x_valid))]
    return ProbeResult(head, scores, metrics, per_label, predictions_frame(volume_names, names, scores, y_valid),
                       y_valid, step)


@torch.no_grad()
def embed_images(
    model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device | str, progress: bool = False
) -> dict[str, Any]:
    """Image embeddings (``model.encode_image``) of every batch of ``loader`` in order, in eval mode.

    Returns ``image_emb`` (N, latent) float32 CPU tensor, ``labels`` (N, K)
    numpy array and ``names``. Runs under whatever autocast context the
    caller holds (the training run's precision).
    """
    image, labels, names = [], [], []
    with _eval_mode(model):
        for batch in tqdm(loader, desc="embed (probe)", disable=not progress, leave=False):
            image.append(model.encode_image(batch["volume"].to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu().numpy())
            names.extend(batch["name"])
    if not image:
        raise ValueError("the probe's training loader yielded no batches; check the train split of the prepared cache")
    return {"image_emb": torch.cat(image), "labels": np.concatenate(labels), "names": names}


def probe_readout(
    model: nn.Module, train_loader: Iterable[dict[str, Any]], valid: Any, cfg: EvalConfig,
    device: torch.device | str, seed: int = 0, progress: bool = False,
) -> ProbeResult:
    """Embed the training split, fit the probe, score ``valid`` (a zero-shot ``EvalResult`` with ``image_emb``).

    The validation embeddings are the ones zero-shot evaluation already
    computed, so the probe costs one image-only forward pass over the
    training split plus the head's fit; ``metrics["wall_probe_s"]`` is that time.
    """
    if valid.image_emb is None:
        raise ValueError("probe_readout needs the evaluation result's image embeddings (EvalResult.image_emb)")
    start = time.perf_counter()
    train = embed_images(model, train_loader, device, progress)
    result = train_probe(train["image_emb"], train["labels"], valid.image_emb, valid.labels, cfg.probe,
                         protocols=cfg.protocols, names=valid.pathologies, volume_names=valid.names,
                         bootstrap=cfg.bootstrap, ci=cfg.ci, seed=seed, device=device)
    result.metrics["wall_probe_s"] = time.perf_counter() - start
    return result
