"""Zero-shot classification (CT-CLIP protocol), retrieval and the ROC figure (the linear probe: core/probe.py).

Zero-shot follows CT-CLIP's ``scripts/zero_shot.py``: for each pathology the
two prompts "{pathology} is present." / "{pathology} is not present." are
embedded, CT-CLIP's model returns temperature.exp() · ⟨text, image⟩ for both,
and the score is the softmax over that pair at the "present" prompt. Here the
temperature is the loss's own scale (``model.loss.scale()``); a SigLIP bias
would cancel in the pair's softmax. The prompts are embedded once, not per
volume. Metrics, bootstrap CIs and paired significance tests live in ``core.metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve
from torch import nn
from tqdm.auto import tqdm

from core.config import EvalConfig
from core.data import PATHOLOGIES
from core.metrics import (
    METRICS,
    RANKING_METRICS,
    THRESHOLD_METRICS,
    bootstrap_ci,
    bootstrap_indices,
    classification_metrics,
    delong_test,
    paired_bootstrap,
    percentile_intervals,
    resample_counts,
    resampled_metrics,
    retrieval_recall,
)

PROMPTS = ("{} is present.", "{} is not present.")

__all__ = [
    "PROMPTS",
    "EvalResult",
    "bootstrap_ci",
    "classification_metrics",
    "delong_test",
    "embed_dataset",
    "evaluate_zero_shot",
    "metric_table",
    "paired_bootstrap",
    "plot_roc",
    "predictions_frame",
    "prompt_embeddings",
    "retrieval_recall",
    "zero_shot_scores",
]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for a block and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def prompt_embeddings(
    model: nn.Module, pathologies: Sequence[str] = PATHOLOGIES, prompts: Sequence[str] = PROMPTS
) -> torch.Tensor:
    """Unit text embeddings of each pathology's prompt pair, (K, 2, latent), "present" first."""
    texts = [template.format(name) for name in pathologies for template in prompts]
    device = _device_of(model)
    with _eval_mode(model):
        tokens = {k: v.to(device) for k, v in model.tokenize(texts).items()}
        emb = model.encode_text(**tokens)
    return emb.float().reshape(len(pathologies), len(prompts), -1)


def zero_shot_scores(image_emb: torch.Tensor, prompt_emb: torch.Tensor, scale: float | torch.Tensor) -> np.ndarray:
    """P(present) per volume and pathology, (N, K): softmax over scale · ⟨image, prompt⟩ of each prompt pair."""
    image_emb = torch.as_tensor(image_emb, dtype=torch.float32)
    prompt_emb = torch.as_tensor(prompt_emb, dtype=torch.float32, device=image_emb.device)
    if image_emb.ndim != 2 or prompt_emb.ndim != 3 or image_emb.shape[1] != prompt_emb.shape[2]:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} must be (N, latent) and prompt_emb "
                         f"{tuple(prompt_emb.shape)} (K, 2, latent) with the same latent size")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=image_emb.device).detach()
    logits = scale * torch.einsum("nd,kpd->nkp", image_emb, prompt_emb)
    return logits.softmax(dim=-1)[..., 0].cpu().double().numpy()


def _report_embeddings(model: nn.Module, batch: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    """A batch's report embeddings: from cached frozen-tower features, its tokens, or its raw text."""
    if "text_features" in batch:
        return model.project_text(batch["text_features"].to(device))
    if "input_ids" in batch:
        tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    else:
        tokens = model.tokenize(list(batch["text"]))
    return model.encode_text(**{k: v.to(device, non_blocking=True) for k, v in tokens.items()})


@torch.no_grad()
def embed_dataset(
    model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device | str, progress: bool = False
) -> dict[str, Any]:
    """Image and report embeddings of every batch of ``loader`` (docs/contracts.md batches), in loader order.

    Returns ``image_emb`` and ``text_emb`` (N, latent) float32 CPU tensors,
    ``labels`` (N, K) numpy array and ``names`` (VolumeName list). Reports are
    projected from the batch's ``text_features`` (a frozen tower's, cached), or
    tokenised with ``model.tokenize`` unless the batch already has ``input_ids``.
    """
    image, text, labels, names = [], [], [], []
    with _eval_mode(model):
        for batch in tqdm(loader, desc="embed", disable=not progress, leave=False):
            image.append(model.encode_image(batch["volume"].to(device, non_blocking=True)).float().cpu())
            text.append(_report_embeddings(model, batch, device).float().cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu().numpy())
            names.extend(batch["name"])
    if not image:
        raise ValueError("the evaluation loader yielded no batches; check eval.split and the prepared cache")
    return {"image_emb": torch.cat(image), "text_emb": torch.cat(text), "labels": np.concatenate(labels),
            "names": names}


# --------------------------------------------------------------------------- metric tables


def _metric_key(prefix: str, metric: str, protocol: str, first: bool) -> str:
    """``zeroshot_f1`` for the first protocol, ``zeroshot_f1_fixed0.5`` for the others (see contracts)."""
    return f"{prefix}_{metric}" if first or metric in RANKING_METRICS else f"{prefix}_{metric}_{protocol}"


def metric_table(
    labels: np.ndarray,
    scores: np.ndarray,
    protocols: Sequence[str],
    names: Sequence[str],
    prefix: str,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Macro metrics named as MLflow logs them (``<prefix>_auroc``, ``<prefix>_f1_fixed0.5``, CIs) and
    the per-label rows of every protocol stacked.

    AUROC / AUPRC do not depend on the threshold protocol and are reported
    once; the threshold metrics of protocols after the first carry the
    protocol's name as suffix. With ``bootstrap`` > 0 every protocol is
    bootstrapped on the same resamples, giving ``<key>_ci_low`` / ``<key>_ci_high``.
    """
    if not protocols:
        raise ValueError("name at least one threshold protocol, e.g. ['ctclip']")
    metrics: dict[str, float] = {}
    tables = []
    weights = resample_counts(bootstrap_indices(len(labels), bootstrap, seed), len(labels)) if bootstrap else None
    for i, protocol in enumerate(protocols):
        per_label, macro = classification_metrics(labels, scores, protocol, names)
        tables.append(per_label)
        wanted = METRICS if i == 0 else THRESHOLD_METRICS
        for metric in wanted:
            metrics[_metric_key(prefix, metric, protocol, i == 0)] = macro[metric]
        if weights is not None:
            samples = resampled_metrics(np.asarray(labels, float), np.asarray(scores, float), protocol, weights,
                                        wanted)
            for metric, (low, high) in percentile_intervals(samples, ci).items():
                key = _metric_key(prefix, metric, protocol, i == 0)
                metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = low, high
    return metrics, pd.concat(tables, ignore_index=True)


@dataclass
class EvalResult:
    """One zero-shot evaluation: logged metrics, per-label table, per-volume predictions and raw arrays."""

    metrics: dict[str, float]
    per_label: pd.DataFrame
    predictions: pd.DataFrame
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    names: list[str] = field(repr=False)
    pathologies: list[str] = field(default_factory=lambda: list(PATHOLOGIES), repr=False)
    image_emb: torch.Tensor | None = field(default=None, repr=False)  # (N, latent), reused by the linear probe

    def write_artifacts(self, folder: str | Path) -> list[Path]:
        """Write ``zeroshot_per_label.csv``, ``zeroshot_predictions.csv`` and ``roc.png`` into ``folder``."""
        written = write_readout_tables(folder, "zeroshot", self.per_label, self.predictions)
        return [*written, plot_roc(self.labels, self.scores, self.pathologies, Path(folder) / "roc.png")]


def write_readout_tables(folder: str | Path, readout: str, per_label: pd.DataFrame,
                         predictions: pd.DataFrame) -> list[Path]:
    """Write a readout's ``{readout}_per_label.csv`` and ``{readout}_predictions.csv`` (the report reads both)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{readout}_per_label.csv", folder / f"{readout}_predictions.csv"]
    per_label.to_csv(paths[0], index=False)
    predictions.to_csv(paths[1], index=False)
    return paths


def predictions_frame(names: Sequence[str], pathologies: Sequence[str], scores: np.ndarray,
                      labels: np.ndarray) -> pd.DataFrame:
    """Long table of every (volume, pathology): VolumeName, pathology, score, label."""
    n, k = scores.shape
    return pd.DataFrame({
        "VolumeName": np.repeat(np.asarray(names, dtype=object), k),
        "pathology": np.tile(np.asarray(pathologies, dtype=object), n),
        "score": scores.ravel(),
        "label": labels.ravel().astype(int),
    })


def evaluate_zero_shot(
    model: nn.Module, loader: Iterable[dict[str, Any]], cfg: EvalConfig, device: torch.device | str,
    seed: int = 0, progress: bool = False,
) -> EvalResult:
    """Zero-shot classification of the 18 pathologies plus retrieval on ``loader``'s volumes.

    Metric names follow docs/contracts.md: ``zeroshot_auroc`` ... for the first
    of ``cfg.protocols``, ``zeroshot_f1_<protocol>`` for the others, CIs from
    ``cfg.bootstrap`` real resamples when > 0, and ``retrieval_v2t_r<k>`` /
    ``retrieval_t2v_r<k>`` for ``cfg.retrieval_ks``.
    """
    emb = embed_dataset(model, loader, device, progress)
    prompts = prompt_embeddings(model, PATHOLOGIES)
    scores = zero_shot_scores(emb["image_emb"], prompts.cpu(), float(model.loss.scale().detach()))
    labels = np.asarray(emb["labels"], dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} do not match the {len(PATHOLOGIES)} pathologies; "
                         "batches must carry labels in core.data.PATHOLOGIES order")
    metrics, per_label = metric_table(labels, scores, cfg.protocols, PATHOLOGIES, "zeroshot", cfg.bootstrap,
                                      cfg.ci, seed)
    metrics.update(retrieval_recall(emb["image_emb"], emb["text_emb"], cfg.retrieval_ks))
    return EvalResult(metrics, per_label, predictions_frame(emb["names"], PATHOLOGIES, scores, labels),
                      scores, labels, list(emb["names"]), image_emb=emb["image_emb"])


# --------------------------------------------------------------------------- figure


def plot_roc(
    labels: Any, scores: Any, names: Sequence[str], path: str | Path, title: str = "Zero-shot ROC per pathology"
) -> Path:
    """Write a PNG of every pathology's ROC curve (AUROC in the legend) with the macro AUROC in the title.

    Labels with a single class have no ROC curve and are listed as n/a.
    """
    import seaborn as sns

    labels, scores = np.asarray(labels), np.asarray(scores)
    fig = Figure(figsize=(10, 6.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = sns.color_palette("husl", len(names))
    aurocs = []
    for k, name in enumerate(names):
        y, style = labels[:, k], ("-", "--", ":")[k % 3]  # neighbouring hues differ in dash as well
        if y.min() == y.max():
            ax.plot([], [], color=colours[k], linestyle=style, label=f"{name} (n/a: one class)")
            continue
        fpr, tpr, _ = roc_curve(y, scores[:, k])
        area = float(auc(fpr, tpr))
        aurocs.append(area)
        ax.plot(fpr, tpr, color=colours[k], linestyle=style, linewidth=1.4, label=f"{name} ({area:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="-.", color="grey", linewidth=1, label="chance")
    macro = f"{np.mean(aurocs):.3f}" if aurocs else "n/a"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title=f"{title} — macro AUROC {macro}")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="pathology (AUROC)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
