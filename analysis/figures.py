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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_auc_score, roc_curve

from analysis.formats import METRIC_NAMES, memory_unit
from analysis.tables import METRICS
from core.naming import short_name

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


HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++", "--", "**", "||")
DASHES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 3)), (0, (3, 1, 1, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_BLOCK_AXES = ("encoder", "mlp", "norm", "adaptation")


@dataclass(frozen=True)
class Look:
    """How one configuration is drawn: its panel (``facet``: the loss), its colour (the block: encoder, MLP,
    norm, adaptation) and its attention kernel as bar hatching / line dashes / marker."""

    facet: str
    colour: tuple[float, float, float]
    hatch: str
    dashes: str | tuple
    marker: str


Looks = Mapping[str, Look]


def _hatch(index: int) -> str:
    """The ``index``-th hatching; past the list, patterns repeat denser ("//" → "////") so none recurs."""
    if index < len(HATCHES):
        return HATCHES[index]
    patterns = HATCHES[1:]  # "" (no hatching) only once
    index -= len(HATCHES)
    return patterns[index % len(patterns)] * (index // len(patterns) + 2)


def _dashes(index: int) -> str | tuple:
    """The ``index``-th line style; past the list, dash patterns of growing length so none recurs."""
    if index < len(DASHES):
        return DASHES[index]
    return (0, (index - len(DASHES) + 2, 2, 1, 2))


def looks(runs: pd.DataFrame) -> dict[str, Look]:
    """One distinct look per configuration, laid out by axis: a panel per loss, a colour per block (encoder +
    MLP + norm + adaptation), a hatch / dash / marker per attention kernel. Configurations that share every
    component (seeds, another lr) get colours of their own, so no two configurations look alike at any size.

    ``runs`` has a ``config`` column and the ``component.<axis>`` columns of ``analysis.runs``; a configuration
    without them is its own block.
    """
    frame = runs.drop_duplicates("config").reset_index(drop=True)
    component = {axis: frame.get(f"component.{axis}", pd.Series([None] * len(frame))).fillna("").astype(str)
                 for axis in (*_BLOCK_AXES, "attention", "loss")}
    same = pd.DataFrame(component).duplicated(keep=False)  # configurations that differ in no component
    blocks = [tuple(component[a][i] for a in _BLOCK_AXES) + ((frame["config"][i],) if same[i] or
                                                              not any(component[a][i] for a in _BLOCK_AXES) else ())
              for i in range(len(frame))]
    block_ids = {b: i for i, b in enumerate(dict.fromkeys(blocks))}
    colours = sns.color_palette("colorblind" if len(block_ids) <= 10 else "husl", len(block_ids))
    attentions = {a: i for i, a in enumerate(dict.fromkeys(component["attention"]))}
    out = {}
    for i, config in enumerate(frame["config"]):
        kernel = attentions[component["attention"][i]]
        loss = component["loss"][i]
        out[config] = Look(facet=f"loss: {short_name('loss', loss)}" if loss else "",
                           colour=tuple(colours[block_ids[blocks[i]]]), hatch=_hatch(kernel),
                           dashes=_dashes(kernel), marker=MARKERS[kernel % len(MARKERS)])
    return out


def _facets(configs: list[str], styles: Looks) -> dict[str, list[str]]:
    """Configurations per panel, in the order given."""
    panels: dict[str, list[str]] = {}
    for config in configs:
        panels.setdefault(styles[config].facet, []).append(config)
    return panels


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


def metric_bars(table: pd.DataFrame, path: Path, protocol: str, styles: Looks | None = None,
                readout: str = "Zero-shot") -> Path:
    """Grouped bars of the macro metrics per configuration (``readout``'s: zero-shot or linear probe) with 95 % CI
    whiskers where known; a panel per loss, colour per block, hatching per attention kernel (``looks``)."""
    styles = styles or looks(table)
    metrics = [m for m in METRICS if table[m].notna().any()]
    panels = _facets(list(table["config"]), styles)
    rows = table.set_index("config")
    x = np.arange(len(metrics))
    widest = max(len(c) for c in panels.values())
    columns = min(2, len(panels))
    rows_n = -(-len(panels) // columns)
    legend_rows = -(-widest // 2)
    with _style():
        fig = _figure(min(24.0, max(8.0, columns * (0.16 * len(metrics) * widest + 2.5))),
                      rows_n * (3.6 + 0.18 * legend_rows) + 0.6)
        grid = fig.subplots(rows_n, columns, sharey=True, squeeze=False)
        axes = list(grid.ravel())
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        for ax, (facet, configs) in zip(axes, panels.items(), strict=False):
            width = 0.8 / len(configs)
            for j, config in enumerate(configs):
                row, look = rows.loc[config], styles[config]
                values = row[metrics].to_numpy(dtype=float)
                low = row[[f"{m}_ci_low" for m in metrics]].to_numpy(dtype=float)
                high = row[[f"{m}_ci_high" for m in metrics]].to_numpy(dtype=float)
                ax.bar(x + (j - (len(configs) - 1) / 2) * width, values, width, color=look.colour, hatch=look.hatch,
                       edgecolor="0.25", linewidth=0.6, label=config, yerr=np.vstack([values - low, high - values]),
                       capsize=3, error_kw={"elinewidth": 1, "ecolor": "0.2"})
            ax.set_xticks(x, [METRIC_NAMES[m] for m in metrics])
            ax.set(ylim=(0, 1.05), xlabel="metric (macro mean over pathologies)", title=facet or None,
                   ylabel="score (0–1)" if ax in grid[:, 0] else "")
            ax.legend(title="configuration", loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                      ncol=2 if len(configs) > 1 else 1, fontsize=8)
        fig.suptitle(f"{readout} metrics, protocol {protocol} (whiskers: 95 % CI; colour: block, hatching: "
                     "attention)")
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
               styles: Looks) -> Path:
    """One ROC panel per configuration in ``predictions`` (e.g. best and baseline), titled with its role."""
    configs = list(predictions)
    with _style():
        fig = _figure(5.2 * len(configs) + 0.6, 5.2)
        axes = fig.subplots(1, len(configs), squeeze=False)[0]
        for ax, config in zip(axes, configs, strict=True):
            _roc_panel(ax, predictions[config], f"{roles[config]}: {config}", styles[config].colour)
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
                    styles: Looks) -> Path:
    """Training loss vs optimizer step (top) and validation zero-shot AUROC vs epoch (bottom), a column per
    loss, one line per configuration: colour per block, dashes and markers per attention kernel."""
    loss, window = _smooth(loss) if not loss.empty else (loss, 1)
    panels = _facets(configs, styles)
    with _style():
        fig = _figure(max(9.0, 6.2 * len(panels) + 3.5), 8.4)
        grid = fig.subplots(2, len(panels), squeeze=False)  # losses differ in scale: each panel its own y
        rows = ((loss, None, "training loss" + (f" (rolling mean of {window} steps)" if window > 1 else ""),
                 "optimizer step", "training loss"),
                (validation, "marker", "zero-shot AUROC (macro)", "epoch", "validation zero-shot AUROC"))
        for r, (data, marker, ylabel, xlabel, title) in enumerate(rows):
            for c, (facet, members) in enumerate(panels.items()):
                ax = grid[r][c]
                shown = data[data["config"].isin(members)] if not data.empty else data
                if shown.empty:
                    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                for config in members:
                    line = shown[shown["config"] == config].sort_values("step") if not shown.empty else shown
                    if line.empty:
                        continue
                    look = styles[config]
                    ax.plot(line["step"], line["value"], color=look.colour, linestyle=look.dashes, linewidth=1.6,
                            marker=look.marker if marker else None, markersize=5, label=config)
                ax.set(xlabel=xlabel, ylabel=ylabel if c == 0 else "",
                       title=f"{title}, {facet}" if facet else title)
                ax.xaxis.get_major_locator().set_params(integer=True)
        for c, members in enumerate(panels.values()):
            grid[1][c].legend(handles=[Line2D([], [], color=styles[m].colour, linestyle=styles[m].dashes,
                                              marker=styles[m].marker, label=m) for m in members],
                              title="configuration", loc="upper center", bbox_to_anchor=(0.5, -0.18),
                              frameon=False, ncol=2, fontsize=8)
    return _save(fig, path)


def efficiency_bars(table: pd.DataFrame, path: Path, styles: Looks | None = None) -> Path:
    """Peak memory and training-step time per benchmarked configuration (baseline first), values on the bars,
    each bar in its configuration's colour and hatching."""
    unit, scale = memory_unit(table["peak_memory_mb"])
    data = table.assign(memory=table["peak_memory_mb"] / scale)
    styles = styles or looks(table)
    with _style():
        fig = _figure(12.0, max(3.2, 0.55 * len(table) + 2.0))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, column, xlabel, title in ((axes[0], "memory", f"peak memory ({unit})", "Peak memory"),
                                          (axes[1], "step_ms", "training step (ms, median)", "Training-step time")):
            sns.barplot(data=data, y="config", x=column, hue="config",
                        palette={c: styles[c].colour for c in data["config"]}, legend=False, ax=ax)
            for patch, config in zip(ax.patches, data["config"], strict=False):
                patch.set(hatch=styles[config].hatch, edgecolor="0.25", linewidth=0.6)
            for container in ax.containers:
                ax.bar_label(container, fmt="%.1f", padding=3, fontsize=8)
            ax.set(xlabel=xlabel, ylabel="configuration" if ax is axes[0] else "", title=title)
            ax.margins(x=0.15)
    return _save(fig, path)
