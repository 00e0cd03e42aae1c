"""Multi-label classification and retrieval metrics, bootstrap CIs and paired tests (numpy / scikit-learn).

Conventions:

- ``labels`` and ``scores`` are (N, K) arrays: N volumes, K labels; a label
  is predicted positive when ``score > threshold`` (strictly, as CT-CLIP).
- A label with only one class among the N volumes cannot be ranked: every
  metric of that label is NaN and it is left out of the macro means, with one
  logged warning naming it.
- The threshold of F1 / precision / recall / accuracy comes from a named
  protocol in ``THRESHOLDS`` (``ctclip``, ``fixed0.5``, ``youden``), and the
  protocol is reported beside every such number.

The bootstrap really resamples volumes: each resample is a multiset of N
volume indices drawn with replacement, applied as per-volume multiplicities,
so every metric of all resamples comes out of a few matrix products and
cumulative sums instead of thousands of scikit-learn calls (the vectorised
AUROC / AUPRC equal scikit-learn on the resampled arrays; see the tests).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from core.registry import PROTOCOLS

log = logging.getLogger(__name__)

RANKING_METRICS = ("auroc", "auprc")
THRESHOLD_METRICS = ("f1", "precision", "recall", "accuracy")
METRICS = RANKING_METRICS + THRESHOLD_METRICS

THRESHOLDS = PROTOCOLS

# --------------------------------------------------------------------------- threshold protocols


def _rates(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) of the rule ``score > t`` for every t in ``thresholds``."""
    pred = scores[:, None] > thresholds[None, :]
    pos = labels.astype(bool)
    tpr = pred[pos].sum(0) / pos.sum()
    fpr = pred[~pos].sum(0) / (~pos).sum()
    return tpr, fpr


@THRESHOLDS.register("ctclip")
def ctclip_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """CT-CLIP's operating point (``scripts/bootstrap_values.py``, ``find_threshold``).

    Of the 100 thresholds ``np.linspace(0, 1, 100)``, the one whose (FPR, TPR)
    under ``score > t`` lies closest to the ROC's top-left corner,
    min √((1 − TPR)² + FPR²); CT-CLIP keeps a later threshold on a tie
    (``<=``), so does this. It is chosen once on all volumes and held fixed
    while bootstrapping, as CT-CLIP does.
    """
    grid = np.linspace(0, 1, 100)
    tpr, fpr = _rates(labels, scores, grid)
    distance = np.sqrt((1 - tpr) ** 2 + fpr**2)
    return float(grid[len(grid) - 1 - np.argmin(distance[::-1])])


@THRESHOLDS.register("fixed0.5")
def fixed_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """A fixed 0.5 on the softmax score, as DCFormer reports its weighted F1."""
    return 0.5


@THRESHOLDS.register("youden")
def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The cut that maximises Youden's J = TPR − FPR over all distinct scores.

    Cuts are the midpoints between consecutive distinct scores plus one cut
    below and one at the top (everything positive / negative); the first
    maximum wins.
    """
    distinct = np.unique(scores)
    below = np.nextafter(distinct[0], -np.inf)
    cuts = np.concatenate([[below], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1]]])
    tpr, fpr = _rates(labels, scores, cuts)
    return float(cuts[np.argmax(tpr - fpr)])


def choose_threshold(protocol: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold the named ``protocol`` picks for one label's (labels, scores)."""
    return THRESHOLDS.get(protocol)(labels, scores)


# --------------------------------------------------------------------------- input checks


def _check_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 arrays from (N,) or (N, K) inputs, or a ValueError naming the problem."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim == 1 and scores.ndim == 1:
        labels, scores = labels[:, None], scores[:, None]
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be (N volumes, K labels)")
    if labels.shape[0] == 0:
        raise ValueError("no volumes to evaluate: labels and scores are empty")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1 (binary multi-label targets)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; check the model's outputs")
    return labels, scores


def _label_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [f"label_{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} label names for {k} label columns")
    return list(names)


def _evaluable(labels: np.ndarray) -> np.ndarray:
    """(K,) bool: labels with both classes present among the volumes."""
    positives = labels.sum(0)
    return (positives > 0) & (positives < labels.shape[0])


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN → NaN is the intended answer
        return np.nanmean(x, axis=axis)


# --------------------------------------------------------------------------- point estimates


def _label_row(y: np.ndarray, s: np.ndarray, protocol: str) -> dict[str, float]:
    threshold = choose_threshold(protocol, y, s)
    pred = (s > threshold).astype(int)
    return {
        "auroc": roc_auc_score(y, s),
        "auprc": average_precision_score(y, s),
        "f1": f1_score(y, pred, average="weighted", zero_division=0),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "accuracy": accuracy_score(y, pred),
        "threshold": threshold,
    }


def classification_metrics(
    labels: Any, scores: Any, protocol: str = "ctclip", names: Sequence[str] | None = None
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-label and macro AUROC, AUPRC, and F1 / precision / recall / accuracy at the protocol's threshold.

    F1 is scikit-learn's support-weighted F1 over the two classes (CT-CLIP's
    and DCFormer's ``average="weighted"``); precision and recall are of the
    positive class. Returns a DataFrame (pathology, auroc, auprc, f1,
    precision, recall, accuracy, threshold, protocol) and the macro means
    over the labels that have both classes.
    """
    labels, scores = _check_inputs(labels, scores)
    names = _label_names(names, labels.shape[1])
    THRESHOLDS.get(protocol)
    ok = _evaluable(labels)
    if not ok.all():
        skipped = [n for n, good in zip(names, ok, strict=True) if not good]
        log.warning("only one class present for %s: metrics are NaN and left out of the means", ", ".join(skipped))
    rows = []
    for k, name in enumerate(names):
        missing = dict.fromkeys([*METRICS, "threshold"], np.nan)
        row = _label_row(labels[:, k], scores[:, k], protocol) if ok[k] else missing
        rows.append({"pathology": name, **row, "protocol": protocol})
    per_label = pd.DataFrame(rows, columns=["pathology", *METRICS, "threshold", "protocol"])
    macro = {m: float(_nanmean(per_label[m].to_numpy(dtype=float))) for m in METRICS}
    return per_label, macro


# --------------------------------------------------------------------------- vectorised (weighted) metrics


def ranking_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC and AUPRC of every label under B weightings of the volumes at once.

    ``weights`` (B, N) are per-volume multiplicities (a bootstrap resample's
    counts). For label k, with volumes grouped by equal score, AUROC =
    Σ_g w⁺_g (w⁻ below g + ½ w⁻_g) / (P·N⁻) — the Mann-Whitney U with ties
    counted half — and AUPRC = Σ_g (w⁺_g / P) · precision at cut g, which is
    scikit-learn's average precision. Returns ``{"auroc", "auprc"}``, each
    (B, K), NaN where a weighting leaves a label with one class.
    """
    n_resamples, k_labels = weights.shape[0], labels.shape[1]
    out = {m: np.full((n_resamples, k_labels), np.nan) for m in RANKING_METRICS}
    for k in range(k_labels):
        order = np.argsort(scores[:, k], kind="stable")
        sorted_scores, y = scores[order, k], labels[order, k]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        w = weights[:, order]
        pos = np.add.reduceat(w * y, starts, axis=1)  # (B, G), groups in ascending score
        neg = np.add.reduceat(w * (1 - y), starts, axis=1)
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        valid = (n_pos > 0) & (n_neg > 0)
        neg_below = np.cumsum(neg, axis=1) - neg
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (pos * (neg_below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
            tp_at_or_above = n_pos[:, None] - (np.cumsum(pos, axis=1) - pos)
            fp_at_or_above = n_neg[:, None] - (np.cumsum(neg, axis=1) - neg)
            precision = np.where(pos > 0, tp_at_or_above / (tp_at_or_above + fp_at_or_above), 0.0)
            auprc = (pos * precision).sum(1) / n_pos
        out["auroc"][valid, k] = auroc[valid]
        out["auprc"][valid, k] = auprc[valid]
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def threshold_metrics(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted F1, precision, recall and accuracy of every label under B weightings, each (B, K).

    Confusion counts are matrix products of the (B, N) weights with the
    (N, K) indicator matrices; weighted F1 = (P·F1⁺ + N⁻·F1⁻) / (P + N⁻),
    scikit-learn's ``average="weighted"``.
    """
    y, pred = labels.astype(np.float64), predictions.astype(np.float64)
    tp = weights @ (y * pred)
    n_pos = weights @ y
    n_pred = weights @ pred
    total = weights.sum(1, keepdims=True)
    fp, fn = n_pred - tp, n_pos - tp
    tn = total - tp - fp - fn
    n_neg = total - n_pos
    f1_pos = _safe_div(2 * tp, 2 * tp + fp + fn)
    f1_neg = _safe_div(2 * tn, 2 * tn + fn + fp)
    return {
        "f1": (n_pos * f1_pos + n_neg * f1_neg) / total,
        "precision": _safe_div(tp, n_pred),
        "recall": _safe_div(tp, n_pos),
        "accuracy": (tp + tn) / total,
    }


def bootstrap_indices(n_items: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(n_resamples, n_items) volume indices drawn with replacement from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def resample_counts(indices: np.ndarray, n_items: int) -> np.ndarray:
    """Multiplicity of each volume in each resample of ``indices`` (B, N), as (B, N) float64 weights."""
    offsets = indices + n_items * np.arange(indices.shape[0])[:, None]
    return np.bincount(offsets.ravel(), minlength=indices.size).reshape(indices.shape).astype(np.float64)


def resampled_metrics(
    labels: np.ndarray, scores: np.ndarray, protocol: str, weights: np.ndarray, metrics: Sequence[str] = METRICS
) -> dict[str, np.ndarray]:
    """Per-resample macro means, ``metric -> (B,)``, under volume ``weights`` (B, N).

    Thresholds are chosen once by ``protocol`` on all volumes and held fixed
    across resamples (CT-CLIP's procedure). Labels with one class on the full
    data are left out, as in the point estimate.
    """
    ok = _evaluable(labels)
    labels, scores = labels[:, ok], scores[:, ok]
    per_label: dict[str, np.ndarray] = {}
    if any(m in RANKING_METRICS for m in metrics):
        per_label.update(ranking_metrics(labels, scores, weights))
    if any(m in THRESHOLD_METRICS for m in metrics):
        thresholds = np.array([choose_threshold(protocol, labels[:, k], scores[:, k]) for k in range(labels.shape[1])])
        counts = threshold_metrics(labels, scores > thresholds[None, :], weights)
        # a resample that draws a single class for a label cannot score it, as with the point estimate
        n_pos = weights @ labels
        single_class = (n_pos == 0) | (n_pos == weights.sum(1, keepdims=True))
        per_label.update({m: np.where(single_class, np.nan, v) for m, v in counts.items()})
    return {m: _nanmean(per_label[m], axis=1) for m in metrics}


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")


def bootstrap_ci(
    labels: Any,
    scores: Any,
    protocol: str = "ctclip",
    n: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of the macro metrics, ``metric -> (low, high)``.

    Volumes are resampled with replacement ``n`` times (seeded); unlike
    CT-CLIP's ``bootstrap_values.py``, which draws indices but evaluates the
    unresampled arrays, every resample here is a real one.
    """
    labels, scores = _check_inputs(labels, scores)
    _check_metrics(metrics)
    THRESHOLDS.get(protocol)
    if n < 1 or not 0 < ci < 1:
        raise ValueError(f"bootstrap needs n >= 1 resamples and 0 < ci < 1 (got n={n}, ci={ci})")
    weights = resample_counts(bootstrap_indices(labels.shape[0], n, seed), labels.shape[0])
    samples = resampled_metrics(labels, scores, protocol, weights, metrics)
    return percentile_intervals(samples, ci)


def percentile_intervals(samples: dict[str, np.ndarray], ci: float) -> dict[str, tuple[float, float]]:
    """(low, high) percentiles of each metric's bootstrap samples, NaN resamples ignored."""
    tail = 100 * (1 - ci) / 2
    out = {}
    for metric, values in samples.items():
        if np.isnan(values).all():
            out[metric] = (float("nan"), float("nan"))
        else:
            low, high = np.nanpercentile(values, [tail, 100 - tail])
            out[metric] = (float(low), float(high))
    return out


# --------------------------------------------------------------------------- paired tests


def paired_bootstrap(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    metric: str = "auroc",
    n: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    protocol: str = "ctclip",
) -> dict[str, float]:
    """Paired bootstrap test of macro ``metric``(a) − ``metric``(b) on the same volumes.

    Both configurations are scored on the same resamples, so the CI and the
    two-sided p-value — 2 · min(#{Δ* ≤ 0}, #{Δ* ≥ 0}) + 1 over n + 1, capped
    at 1 — account for their correlation. Returns delta, ci_low, ci_high, p_value.
    """
    labels, scores_a = _check_inputs(labels, scores_a)
    _, scores_b = _check_inputs(labels, scores_b)
    _check_metrics([metric])
    delta = classification_metrics(labels, scores_a, protocol)[1][metric] - \
        classification_metrics(labels, scores_b, protocol)[1][metric]
    weights = resample_counts(bootstrap_indices(labels.shape[0], n, seed), labels.shape[0])
    deltas = resampled_metrics(labels, scores_a, protocol, weights, [metric])[metric] - \
        resampled_metrics(labels, scores_b, protocol, weights, [metric])[metric]
    deltas = deltas[~np.isnan(deltas)]
    low, high = percentile_intervals({metric: deltas}, ci)[metric]
    side = min((deltas <= 0).sum(), (deltas >= 0).sum())
    p_value = min(1.0, 2 * (side + 1) / (len(deltas) + 1))
    return {"delta": float(delta), "ci_low": low, "ci_high": high, "p_value": float(p_value)}


def delong_test(labels: Any, scores_a: Any, scores_b: Any) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs on one binary label (DeLong et al. 1988, Sun & Xu 2014).

    Structural components come from mid-ranks; Var(Δ) = Var(A) + Var(B) − 2 Cov(A, B).
    Returns auc_a, auc_b, delta, z and the two-sided p_value.
    """
    y = np.asarray(labels, dtype=bool).ravel()
    a, b = np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()
    if not (y.shape == a.shape == b.shape):
        raise ValueError(f"labels {y.shape}, scores_a {a.shape} and scores_b {b.shape} must have the same length")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two positive and two negative volumes")
    v10, v01 = [], []
    for s in (a, b):
        ranks = stats.rankdata(s)
        v10.append((ranks[y] - stats.rankdata(s[y])) / n)
        v01.append(1 - (ranks[~y] - stats.rankdata(s[~y])) / m)
    auc = np.array([v.mean() for v in v10])
    cov = np.cov(np.stack(v10)) / m + np.cov(np.stack(v01)) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = float(auc[0] - auc[1])
    if var <= 1e-15:
        z, p = 0.0, 1.0 if abs(delta) < 1e-12 else 0.0
    else:
        z = delta / float(np.sqrt(var))
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "delta": delta, "z": z, "p_value": p}


# --------------------------------------------------------------------------- retrieval


def retrieval_recall(image_emb: Any, text_emb: Any, ks: Sequence[int] = (1, 5, 10, 50)) -> dict[str, float]:
    """Volume→report and report→volume Recall@k; pair i matches i.

    A query is a hit at k when fewer than k candidates score strictly higher
    than its match (cosine similarity of unit embeddings). A k above N is
    clipped to N (recall 1) with a warning; keys keep the requested k:
    ``retrieval_v2t_r1``, ``retrieval_t2v_r1``, ...
    """
    image = np.asarray(image_emb, dtype=np.float64)
    text = np.asarray(text_emb, dtype=np.float64)
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image_emb {image.shape} and text_emb {text.shape} must both be (N, latent)")
    sims = image @ text.T
    matched = np.diag(sims)
    rank_v2t = (sims > matched[:, None]).sum(1)
    rank_t2v = (sims > matched[None, :]).sum(0)
    n = sims.shape[0]
    clipped = [k for k in ks if k > n]
    if clipped:
        log.warning("retrieval: k=%s larger than the %d pairs; clipped to %d", clipped, n, n)
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"retrieval k must be >= 1, got {k}")
        out[f"retrieval_v2t_r{k}"] = float((rank_v2t < min(k, n)).mean())
        out[f"retrieval_t2v_r{k}"] = float((rank_t2v < min(k, n)).mean())
    return out


__all__ = [
    "METRICS",
    "THRESHOLDS",
    "bootstrap_ci",
    "bootstrap_indices",
    "choose_threshold",
    "classification_metrics",
    "delong_test",
    "paired_bootstrap",
    "percentile_intervals",
    "ranking_metrics",
    "resample_counts",
    "resampled_metrics",
    "retrieval_recall",
    "threshold_metrics",
]
