"""The report's seaborn figures, written as PNG (150 dpi) through matplotlib's Agg canvas.

Each function takes a table from ``analysis.tables`` (or artifact frames),
draws one figure with labelled axes and units, saves it and returns its path.
Figures are built on ``matplotlib.figure.Figure`` objects, so no pyplot state
or display backend is involved.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from analysis.formats import METRIC_NAMES, memory_unit
from analysis.tables import METRICS

DPI = 150
_FPR_GRID = np.linspace(0, 1, 201)


@contextlib.contextmanager
def _style(grid: bool = True) -> Iterator[None]:
    with sns.axes_style("whitegrid" if grid else "white"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


Colours = Mapping[str, tuple[float, float, float]]


def palette(configs: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per configuration (colour-blind safe), so a configuration looks the same in every figure."""
    return dict(zip(configs, sns.color_palette("colorblind", len(configs)), strict=True))


def pathology_heatmap(table: pd.DataFrame, path: Path, metric: str = "AUROC") -> Path:
    """Configurations × pathologies heat-map of ``metric``, annotated, coloured around chance (0.5)."""
    n_rows, n_cols = table.shape
    with _style(grid=False):
        fig = _figure(max(8.0, 0.6 * n_cols + 4.0), max(3.5, 0.5 * n_rows + 3.2))
        ax = fig.add_subplot()
        with warnings.catch_warnings():  # seaborn's own use of Colormap.set_bad
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(table, ax=ax, cmap="RdYlGn", center=0.5, annot=True, fmt=".2f", annot_kws={"size": 7},
                        linewidths=0.5, linecolor="white", cbar_kws={"label": f"zero-shot {metric} (0.5 = chance)"})
        ax.set_facecolor("0.85")  # NaN cells: a pathology with one class among the volumes
        unscored = " (grey: one class only, not scored)" if table.isna().any().any() else ""
        ax.set(xlabel=f"pathology{unscored}", ylabel="configuration", title=f"Zero-shot {metric} per pathology")
        ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
        ax.tick_params(axis="y", rotation=0)
    return _save(fig, path)


def metric_bars(table: pd.DataFrame, path: Path, protocol: str, colours: Colours | None = None) -> Path:
    """Grouped bars of the macro metrics per configuration with 95 % CI whiskers where logged."""
    configs = list(table["config"])
    metrics = [m for m in METRICS if table[m].notna().any()]
    colours = colours or palette(configs)
    width = 0.8 / len(configs)
    x = np.arange(len(metrics))
    with _style():
        fig = _figure(min(20.0, max(8.0, 0.35 * len(metrics) * len(configs) + 5.0)), 4.8)
        ax = fig.add_subplot()
        for j, row in enumerate(table.itertuples(index=False)):
            values = np.array([getattr(row, m) for m in metrics], dtype=float)
            low = np.array([getattr(row, f"{m}_ci_low") for m in metrics], dtype=float)
            high = np.array([getattr(row, f"{m}_ci_high") for m in metrics], dtype=float)
            ax.bar(x + (j - (len(configs) - 1) / 2) * width, values, width, color=colours[row.config],
                   label=row.config, yerr=np.vstack([values - low, high - values]), capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "0.2"})
        ax.set_xticks(x, [METRIC_NAMES[m] for m in metrics])
        ax.set(ylim=(0, 1.05), xlabel="metric (macro mean over pathologies)", ylabel="score (0–1)",
               title=f"Zero-shot metrics, protocol {protocol} (whiskers: 95 % CI)")
        ax.legend(title="configuration", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _save(fig, path)


def _roc_panel(ax: object, predictions: pd.DataFrame, title: str, colour: object) -> None:
    """Faint per-pathology ROC curves and their mean (TPR averaged on a common FPR grid) in bold."""
    curves, areas = [], []
    for _, group in predictions.groupby("pathology", sort=False):
        if group["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(group["label"], group["score"])
        ax.plot(fpr, tpr, color=colour, alpha=0.18, linewidth=0.8)
        curves.append(np.interp(_FPR_GRID, fpr, tpr))
        areas.append(roc_auc_score(group["label"], group["score"]))
    if curves:
        ax.plot(_FPR_GRID, np.mean(curves, axis=0), color=colour, linewidth=2.4,
                label=f"mean over {len(curves)} pathologies (macro AUROC {np.mean(areas):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)


def roc_curves(predictions: Mapping[str, pd.DataFrame], roles: Mapping[str, str], path: Path,
               colours: Colours | None = None) -> Path:
    """One ROC panel per configuration in ``predictions`` (e.g. best and baseline), titled with its role."""
    configs = list(predictions)
    colours = colours or palette(configs)
    with _style():
        fig = _figure(5.2 * len(configs) + 0.6, 5.2)
        axes = fig.subplots(1, len(configs), squeeze=False)[0]
        for ax, config in zip(axes, configs, strict=True):
            _roc_panel(ax, predictions[config], f"{roles[config]}: {config}", colours[config])
        fig.suptitle("Zero-shot ROC curves (thin: each pathology; bold: their mean)")
    return _save(fig, path)


def _smooth(history: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rolling mean of long loss curves (window = 1 % of the longest run), and the window."""
    window = max(1, int(history.groupby("config").size().max()) // 100)
    if window == 1:
        return history, 1
    smoothed = history.sort_values("step").copy()
    smoothed["value"] = smoothed.groupby("config")["value"].transform(lambda s: s.rolling(window, 1).mean())
    return smoothed, window


def training_curves(loss: pd.DataFrame, validation: pd.DataFrame, configs: list[str], path: Path,
                    colours: Colours | None = None) -> Path:
    """Training loss vs optimizer step and validation zero-shot AUROC vs epoch, one line per configuration."""
    colours = colours or palette(configs)
    with _style():
        fig = _figure(13.0, 4.8)
        ax_loss, ax_val = fig.subplots(1, 2)
        loss, window = _smooth(loss) if not loss.empty else (loss, 1)
        panels = ((ax_loss, loss, None, "training loss" + (f" (rolling mean of {window} steps)" if window > 1 else ""),
                   "optimizer step", "Training loss"),
                  (ax_val, validation, "o", "zero-shot AUROC (macro)", "epoch", "Validation zero-shot AUROC"))
        for ax, data, marker, ylabel, xlabel, title in panels:
            if data.empty:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            else:
                sns.lineplot(data=data, x="step", y="value", hue="config", hue_order=configs, palette=colours,
                             marker=marker, estimator=None, ax=ax, legend=ax is ax_val)
            ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if not validation.empty:
            ax_val.xaxis.get_major_locator().set_params(integer=True)
            ax_val.legend(title="configuration", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _save(fig, path)


def efficiency_bars(table: pd.DataFrame, path: Path, colours: Colours | None = None) -> Path:
    """Peak memory and training-step time per benchmarked configuration (baseline first), values on the bars."""
    unit, scale = memory_unit(table["peak_memory_mb"])
    data = table.assign(memory=table["peak_memory_mb"] / scale)
    colours = colours or palette(list(table["config"]))
    with _style():
        fig = _figure(12.0, max(3.2, 0.55 * len(table) + 2.0))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, column, xlabel, title in ((axes[0], "memory", f"peak memory ({unit})", "Peak memory"),
                                          (axes[1], "step_ms", "training step (ms, median)", "Training-step time")):
            sns.barplot(data=data, y="config", x=column, hue="config", palette=dict(colours), legend=False, ax=ax)
            for container in ax.containers:
                ax.bar_label(container, fmt="%.1f", padding=3, fontsize=8)
            ax.set(xlabel=xlabel, ylabel="configuration" if ax is axes[0] else "", title=title)
            ax.margins(x=0.15)
    return _save(fig, path)
