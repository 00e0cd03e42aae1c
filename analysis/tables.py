"""The report's tables as numeric DataFrames: performance, comparisons, effects, interactions, the negative
control, per-pathology AUROC, efficiency.

Every function takes ``load_runs`` frames (one row per run; the runs of one
configuration at several seeds share ``config``, the row label) and returns
plain numbers, one row per configuration or comparison; the statistics come
from ``analysis.effects``; ``analysis.formats`` turns tables into Markdown /
LaTeX text and the CSVs hold them unrounded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from analysis.contrasts import configurations, interaction_contrasts, main_effect_contrasts, negative_control
from analysis.effects import Effect, Replicates, effects_frame, holm
from analysis.readouts import DEFAULT_METRIC, other_readout, parse_metric, pathology_order
from core.naming import short_name
from core.registry import ConfigError, closest

log = logging.getLogger(__name__)

METRICS = ("auroc", "f1", "precision", "recall", "auprc")
EFFICIENCY_METRICS = ("params_total", "params_trainable", "gflops", "peak_memory_mb", "visual_fwd_ms",
                      "visual_bwd_ms", "step_ms", "step_ms_min", "step_ms_max")


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


def _seed_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Student's t interval of the mean over seeds (NaN with fewer than two)."""
    if len(values) < 2:
        return np.nan, np.nan
    half = stats.t.ppf(1 - alpha / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _level(replicates: Replicates | None, config: str) -> Effect | None:
    return replicates.level(config) if replicates is not None and config in replicates.mean else None


def _summary(group: pd.DataFrame, key: str, replicates: Replicates | None = None) -> dict[str, float]:
    """Mean, sd over seeds and 95 % CI of logged metric ``key`` for one configuration's runs.

    One seed: the run's logged CI (its volume bootstrap). Several: the two-level bootstrap's CI (seeds and
    volumes) when ``replicates`` hold the configuration, else Student's t over the seeds' values.
    """
    values = _metric(group, key).dropna().to_numpy()
    if len(values) == 0:
        return {key: np.nan, f"{key}_sd": np.nan, f"{key}_ci_low": np.nan, f"{key}_ci_high": np.nan}
    mean = float(values.mean())
    if len(values) == 1:
        low, high = _metric(group, f"{key}_ci_low").dropna(), _metric(group, f"{key}_ci_high").dropna()
        low, high = (low.iloc[0], high.iloc[0]) if len(low) and len(high) else (np.nan, np.nan)
    else:
        level = _level(replicates, str(group["config"].iloc[0]))
        if level is not None:  # the two-level CI, centred on the logged mean it describes
            low, high = mean - (level.delta - level.ci_low), mean + (level.ci_high - level.delta)
        else:
            low, high = _seed_interval(values)
    return {key: mean, f"{key}_sd": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
            f"{key}_ci_low": max(float(low), 0.0), f"{key}_ci_high": min(float(high), 1.0)}  # every metric is in [0, 1]


def performance_table(runs: pd.DataFrame, baseline: str, metric: str = DEFAULT_METRIC,
                      replicates: Mapping[str, Mapping[str, Replicates] | None] | None = None,
                      comparisons: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per configuration (its seeds aggregated), baseline first.

    Columns: config, n_seeds, seeds, cell_ids, run_ids, protocol; for each of ``METRICS`` of ``metric``'s
    readout its mean over seeds, ``_sd``, ``_ci_low`` / ``_ci_high`` (see ``_summary``, cut to [0, 1]; NaN when
    never logged);
    the other readout's value of the same metric as ``<readout>_<metric>`` (+ ``_ci_low`` / ``_ci_high``);
    ``delta`` = the configuration's mean ``metric`` − the baseline's; and the columns of ``comparisons``
    (the two-level test against the baseline) when given. ``replicates`` maps readout → {metric name → its
    two-level bootstrap} ({"zeroshot": {"auroc": ...}}).
    """
    readout, main = parse_metric(metric)
    other = other_readout(readout)
    replicates = replicates or {}
    rows = []
    for config, group in runs.groupby("config", sort=False):
        row: dict[str, object] = {
            "config": config, "n_seeds": len(group),
            "seeds": ", ".join(str(s) for s in group.get("seed", pd.Series(dtype=object)).dropna()),
            "cell_ids": "; ".join(group["cell_id"].astype(str)), "run_ids": "; ".join(group["run_id"].astype(str)),
            "protocol": group["protocol"].iloc[0]}
        for name in dict.fromkeys((*METRICS, main)):
            summary = _summary(group, f"{readout}_{name}", (replicates.get(readout) or {}).get(name))
            row.update({k.removeprefix(f"{readout}_"): v for k, v in summary.items()})
        row.update(_summary(group, f"{other}_{main}", (replicates.get(other) or {}).get(main)))
        rows.append(row)
    table = pd.DataFrame(rows)
    base_value = table.loc[table["config"] == baseline, main].iloc[0]
    table["delta"] = table[main] - base_value
    if comparisons is not None and not comparisons.empty:
        table = table.merge(comparisons, on="config", how="left")
    return table


def comparison_table(replicates: Replicates | None, contrasts: list[dict]) -> pd.DataFrame:
    """The two-level test of each configuration against the baseline: config, delta_bootstrap (Δ of the
    predictions the test resamples), delta_ci_low / delta_ci_high, p_value, p_adj (Holm over these rows),
    mde, df. Configurations without replicates are left out."""
    if replicates is None:
        return pd.DataFrame()
    usable = [c for c in contrasts if all(k in replicates.mean for k in c["weights"])]
    frame = effects_frame(replicates, usable)
    if frame.empty:
        return frame
    return frame.rename(columns={"delta": "delta_bootstrap", "ci_low": "delta_ci_low", "ci_high": "delta_ci_high"})[
        ["config", "delta_bootstrap", "delta_ci_low", "delta_ci_high", "p_value", "p_adj", "mde", "df"]]


def per_pathology_table(runs: pd.DataFrame, per_label: Mapping[str, pd.DataFrame | None],
                        metric: str = "auroc") -> pd.DataFrame:
    """Configurations × pathologies of ``metric`` from each run's ``zeroshot_per_label.csv`` (its first
    protocol), averaged over a configuration's seeds. ``per_label`` maps run id → frame.

    Runs without the artifact are left out; pathologies keep CT-RATE's order.
    """
    values: dict[str, list[pd.Series]] = {}
    for run_id, config, protocol in zip(runs["run_id"], runs["config"], runs["protocol"], strict=True):
        frame = per_label.get(run_id)
        if frame is None:
            continue
        if "protocol" in frame and protocol in set(frame["protocol"]):
            frame = frame[frame["protocol"] == protocol]
        values.setdefault(config, []).append(
            frame.drop_duplicates("pathology").set_index("pathology")[metric].astype(float))
    rows = {config: pd.concat(series, axis=1).mean(axis=1) for config, series in values.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[pathology_order(list(table.columns))] if not table.empty else table
    table.index.name = "config"
    return table


def _config_means(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Each configuration's mean over seeds of logged ``metric``."""
    return _metric(runs, metric).groupby(runs["config"].to_numpy(), sort=False).mean()


def _tested(replicates: Replicates | None, contrast: dict) -> dict[str, float]:
    if replicates is None or not contrast["weights"] or any(c not in replicates.mean for c in contrast["weights"]):
        return {}
    return replicates.contrast(contrast["weights"]).as_dict()


def _with_holm(frame: pd.DataFrame) -> pd.DataFrame:
    if "p_value" in frame:
        frame["p_adj"] = holm(frame["p_value"])
    return frame


def effect_table(runs: pd.DataFrame, baseline: str, metric: str = DEFAULT_METRIC,
                 replicates: Replicates | None = None) -> pd.DataFrame:
    """Per-component main effect: for each axis that varies, each value against the baseline's value, the mean
    over matched cells (identical except on that axis; seeds are replicates, not cells) of Δ ``metric``.

    Columns: axis, baseline_value, value, mean_delta (of the logged seed means), min_delta / max_delta (over
    the matched pairs), n_pairs; with ``replicates`` also the two-level test of the same contrast (delta,
    se, df, ci_low, ci_high, p_value, mde, n_seeds) and p_adj (Holm over the table's rows).
    """
    means = _config_means(runs, metric)
    rows = []
    for contrast in main_effect_contrasts(configurations(runs), baseline):
        deltas = [float(means[a] - means[b]) for a, b in contrast["pairs"]]
        deltas = [d for d in deltas if not np.isnan(d)]
        rows.append({"axis": contrast["axis"], "baseline_value": contrast["baseline_value"],
                     "value": contrast["value"], "mean_delta": float(np.mean(deltas)) if deltas else np.nan,
                     "min_delta": min(deltas, default=np.nan), "max_delta": max(deltas, default=np.nan),
                     "n_pairs": contrast["n_pairs"], **_tested(replicates, contrast)})
    columns = ["axis", "baseline_value", "value", "mean_delta", "min_delta", "max_delta", "n_pairs"]
    return _with_holm(pd.DataFrame(rows, columns=None if rows else columns))


def interaction_table(runs: pd.DataFrame, baseline: str, metric: str = DEFAULT_METRIC,
                      replicates: Replicates | None = None) -> pd.DataFrame:
    """Two-way interactions (``analysis.contrasts.interaction_contrasts``): axis_a, value_a, baseline_a, axis_b,
    value_b, baseline_b, n_sets, mean (of the logged seed means), and with ``replicates`` the two-level test and
    p_adj (Holm over the table's rows)."""
    means = _config_means(runs, metric)
    rows = []
    for contrast in interaction_contrasts(configurations(runs), baseline):
        logged = float(sum(w * means[c] for c, w in contrast["weights"].items()))
        rows.append({**{k: v for k, v in contrast.items() if k != "weights"}, "mean_delta": logged,
                     **_tested(replicates, contrast)})
    return _with_holm(pd.DataFrame(rows))


def control_check(runs: pd.DataFrame, replicates: Replicates | None) -> dict | None:
    """The built-in negative control: SDPA vs standard attention (the same math) over matched cells.

    None when the matrix has no such pair; else axis, baseline_value, value, n_pairs, and, when tested,
    the two-level Δ with its CI and ``passed`` (the 95 % CI contains 0). Untested: ``passed`` is None.
    """
    contrast = negative_control(configurations(runs))
    if contrast is None:
        return None
    tested = _tested(replicates, contrast)
    passed = bool(tested["ci_low"] <= 0 <= tested["ci_high"]) if tested else None
    return {k: v for k, v in contrast.items() if k not in ("weights", "pairs")} | tested | {"passed": passed}


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
