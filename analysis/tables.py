"""The report's tables as numeric DataFrames: performance, significance, per-pathology AUROC, effects, efficiency.

Every function takes ``load_runs`` frames (one row per configuration, column
``config`` the row label) and returns plain numbers; ``analysis.formats``
turns them into Markdown / LaTeX text and the CSVs hold them unrounded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from core.config import NON_SEMANTIC_KEYS
from core.data.pathologies import PATHOLOGIES
from core.naming import AXES, SEARCH_AXES, short_name
from core.registry import ConfigError, closest

log = logging.getLogger(__name__)

METRICS = ("auroc", "f1", "precision", "recall", "auprc")
EFFICIENCY_METRICS = ("params_total", "params_trainable", "gflops", "peak_memory_mb", "visual_fwd_ms",
                      "visual_bwd_ms", "step_ms")
_AXIS_PARAMS = (*(f"params.model.{axis}" for axis in AXES), *(f"params.{key}" for key in SEARCH_AXES))


def _metric(runs: pd.DataFrame, key: str) -> pd.Series:
    """Column ``metrics.<key>`` of ``runs`` (NaN where the metric was never logged)."""
    column = f"metrics.{key}"
    return runs[column].astype(float) if column in runs else pd.Series(np.nan, index=runs.index)


def declared_match(runs: pd.DataFrame, declared: Mapping[str, str]) -> pd.Series:
    """Rows whose params equal every ``{dotted key: value}`` of a matrix's declared baseline."""
    match = pd.Series(True, index=runs.index)
    for key, value in declared.items():
        column = runs.get(f"params.{key}", pd.Series(None, index=runs.index, dtype=object))
        match &= column.astype(str) == str(value)
    return match


def choose_baseline(runs: pd.DataFrame, label: str | None = None,
                    declared: Mapping[str, str] | None = None) -> str:
    """The baseline configuration's label.

    ``label`` if given (it must be a row); else the row whose params match the
    matrix's declared ``baseline:`` mapping ({"model.attention": "standard", ...});
    else the first row — ``load_runs`` sorts rows baseline-first (standard
    attention, GELU, LayerNorm, softmax CLIP loss, CT-ViT, full training).
    """
    configs = list(runs["config"])
    if label is not None:
        if label not in configs:
            raise ConfigError(f"--baseline '{label}' is not a configuration of this matrix{closest(label, configs)} "
                              f"(configurations: {'; '.join(configs)})")
        return label
    if declared:
        match = declared_match(runs, declared)
        if match.any():
            return str(runs.loc[match, "config"].iloc[0])
        log.warning("no finished run matches the matrix's declared baseline %s; using %s", declared, configs[0])
    return configs[0]


def baseline_first(runs: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``runs`` with the baseline row moved to the top, the others in their order."""
    is_base = runs["config"] == baseline
    return pd.concat([runs[is_base], runs[~is_base]], ignore_index=True)


def performance_table(runs: pd.DataFrame, baseline: str, significance: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per configuration: each of ``METRICS`` with its ``_ci_low`` / ``_ci_high`` (NaN when not logged),
    ``delta_auroc`` against the baseline, and the paired-bootstrap columns of ``significance`` when given.

    Values are the runs' final logged ``zeroshot_*`` metrics (first protocol).
    """
    table = pd.DataFrame({"config": runs["config"], "cell_id": runs["cell_id"], "run_id": runs["run_id"],
                          "protocol": runs["protocol"]})
    for metric in METRICS:
        key = f"zeroshot_{metric}"
        table[metric] = _metric(runs, key).to_numpy()
        table[f"{metric}_ci_low"] = _metric(runs, f"{key}_ci_low").to_numpy()
        table[f"{metric}_ci_high"] = _metric(runs, f"{key}_ci_high").to_numpy()
    base_auroc = table.loc[table["config"] == baseline, "auroc"].iloc[0]
    table["delta_auroc"] = table["auroc"] - base_auroc
    if significance is not None and not significance.empty:
        table = table.merge(significance, on="config", how="left")
    return table


def _wide(predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labels, scores) as volume × pathology frames from the long ``zeroshot_predictions.csv``."""
    labels = predictions.pivot(index="VolumeName", columns="pathology", values="label")
    scores = predictions.pivot(index="VolumeName", columns="pathology", values="score")
    return labels, scores


def _pathology_order(names: list[str]) -> list[str]:
    known = [p for p in PATHOLOGIES if p in names]
    return known + [n for n in names if n not in known]


def significance_table(runs: pd.DataFrame, baseline: str, predictions: Mapping[str, pd.DataFrame | None],
                       n: int = 1000, seed: int = 0) -> tuple[pd.DataFrame | None, list[str]]:
    """Paired bootstrap of macro AUROC, each configuration against the baseline on the same volumes.

    Returns a frame (config, delta_auroc_ci_low, delta_auroc_ci_high, p_value,
    delta_auroc_bootstrap, n_volumes) and notes on what was skipped and why.
    Δ is configuration − baseline; the test is ``core.evaluate.paired_bootstrap``.
    """
    try:
        from core.evaluate import paired_bootstrap
    except ImportError as err:
        note = f"significance not computed: core.evaluate.paired_bootstrap is unavailable ({err})"
        log.info(note)
        return None, [note]
    if predictions.get(baseline) is None:
        return None, [f"significance not computed: the baseline ({baseline}) has no zeroshot_predictions.csv"]
    base_labels, base_scores = _wide(predictions[baseline])
    notes, rows = [], []
    for config in runs["config"]:
        if config == baseline:
            continue
        if predictions.get(config) is None:
            notes.append(f"no significance for {config}: the run has no zeroshot_predictions.csv")
            continue
        labels, scores = _wide(predictions[config])
        volumes = base_labels.index.intersection(labels.index)
        columns = _pathology_order([c for c in base_labels.columns if c in labels.columns])
        if len(volumes) == 0 or not columns:
            notes.append(f"no significance for {config}: no volume/pathology in common with the baseline")
            continue
        y = base_labels.loc[volumes, columns]
        if not y.equals(labels.loc[volumes, columns]):
            notes.append(f"no significance for {config}: its labels differ from the baseline's on the same volumes "
                         "(different evaluation sets)")
            continue
        columns = [c for c in columns if y[c].nunique() == 2]  # one-class pathologies are out of every macro mean
        y = y[columns]
        result = paired_bootstrap(y.to_numpy(float), scores.loc[volumes, columns].to_numpy(float),
                                  base_scores.loc[volumes, columns].to_numpy(float), metric="auroc", n=n, seed=seed)
        logged = _metric(runs, "zeroshot_auroc")
        logged_delta = logged[runs["config"] == config].iloc[0] - logged[runs["config"] == baseline].iloc[0]
        if abs(result["delta"] - logged_delta) > 1e-6:
            notes.append(f"{config}: Δ AUROC from zeroshot_predictions.csv ({result['delta']:+.4f}) differs from "
                         f"the logged metrics' difference ({logged_delta:+.4f}); the table shows the former, "
                         "which its CI and p belong to")
        rows.append({"config": config, "delta_auroc_ci_low": result["ci_low"],
                     "delta_auroc_ci_high": result["ci_high"], "p_value": result["p_value"],
                     "delta_auroc_bootstrap": result["delta"], "n_volumes": len(volumes)})
    return (pd.DataFrame(rows) if rows else None), notes


def per_pathology_table(runs: pd.DataFrame, per_label: Mapping[str, pd.DataFrame | None],
                        metric: str = "auroc") -> pd.DataFrame:
    """Configurations × pathologies of ``metric`` from each run's ``zeroshot_per_label.csv`` (its first protocol).

    Configurations without the artifact are left out; pathologies keep CT-RATE's order.
    """
    rows = {}
    for config, protocol in zip(runs["config"], runs["protocol"], strict=True):
        frame = per_label.get(config)
        if frame is None:
            continue
        if "protocol" in frame and protocol in set(frame["protocol"]):
            frame = frame[frame["protocol"] == protocol]
        rows[config] = frame.drop_duplicates("pathology").set_index("pathology")[metric].astype(float)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[_pathology_order(list(table.columns))] if not table.empty else table
    table.index.name = "config"
    return table


def _context_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that must be equal for two runs to be a matched pair: every component plus every other
    param that varies across the matrix and changes results (not paths, names or logging settings)."""
    varying = [c for c in runs.columns if c.startswith("params.") and c not in _AXIS_PARAMS
               and not c[len("params."):].startswith(NON_SEMANTIC_KEYS) and runs[c].nunique(dropna=False) > 1]
    return [f"component.{axis}" for axis in AXES] + varying


def effect_table(runs: pd.DataFrame, baseline: str, metric: str = "auroc") -> pd.DataFrame:
    """Per-component effect: for each axis that varies, the mean Δ ``metric`` of each value against the
    baseline's value over matched cells (cells identical except on that axis).

    Columns: axis, baseline_value, value, mean_delta, min_delta, max_delta, n_pairs.
    """
    values = _metric(runs, f"zeroshot_{metric}")
    base_row = runs.loc[runs["config"] == baseline].iloc[0]
    context = _context_columns(runs)
    filled = runs[context].fillna("").astype(str)
    rows = []
    for axis in AXES:
        column = f"component.{axis}"
        if runs[column].nunique() < 2:
            continue
        base_value = base_row[column]
        others = [c for c in context if c != column]
        groups = filled.groupby(others, sort=False).groups.values()
        for value in dict.fromkeys(runs[column]):
            if value == base_value:
                continue
            deltas = []
            for index in groups:
                group = runs.loc[index]
                on_base, on_value = values[index][group[column] == base_value], values[index][group[column] == value]
                if len(on_base) and len(on_value):
                    deltas.append(float(on_value.mean() - on_base.mean()))
            rows.append({"axis": axis, "baseline_value": base_value, "value": value,
                         "mean_delta": float(np.mean(deltas)) if deltas else np.nan,
                         "min_delta": min(deltas, default=np.nan), "max_delta": max(deltas, default=np.nan),
                         "n_pairs": len(deltas)})
    columns = ["axis", "baseline_value", "value", "mean_delta", "min_delta", "max_delta", "n_pairs"]
    return pd.DataFrame(rows, columns=columns)


def effect_name(row: pd.Series) -> str:
    """"SA → FA" for one effect-table row."""
    return f"{short_name(row['axis'], row['baseline_value'])} → {short_name(row['axis'], row['value'])}"


def efficiency_baseline(efficiency: pd.DataFrame, train_runs: pd.DataFrame, baseline: str) -> str:
    """The efficiency row that matches the performance baseline (same cell id, else same label, else the first)."""
    cell = train_runs.loc[train_runs["config"] == baseline, "cell_id"].iloc[0]
    for column, wanted in (("cell_id", cell), ("config", baseline)):
        match = efficiency.loc[efficiency[column] == wanted, "config"]
        if len(match):
            return match.iloc[0]
    return efficiency["config"].iloc[0]


def efficiency_table(efficiency: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per benchmarked configuration, baseline first: ``EFFICIENCY_METRICS`` as logged, plus
    ``memory_change_pct`` (peak memory vs the baseline, %) and ``step_speedup`` (baseline step ms / step ms)."""
    efficiency = baseline_first(efficiency, baseline)
    table = pd.DataFrame({"config": efficiency["config"], "cell_id": efficiency["cell_id"],
                          "run_id": efficiency["run_id"]})
    for metric in EFFICIENCY_METRICS:
        table[metric] = _metric(efficiency, metric).to_numpy()
    base = table.iloc[0]
    table["memory_change_pct"] = (table["peak_memory_mb"] / base["peak_memory_mb"] - 1) * 100
    table["step_speedup"] = base["step_ms"] / table["step_ms"]
    return table
