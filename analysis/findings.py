"""The report's findings in words: one sentence per main effect, the smallest detectable Δ, the negative control.

Sentences are built from the effect tables' numbers only, so the words can
never disagree with the tables below them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.formats import METRIC_NAMES, number, p_value, with_ci
from core.naming import short_name

ALPHA = 0.05


def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric.split("_", 1)[-1], metric)


def _seeds(n: object) -> str:
    n = int(n)  # type: ignore[call-overload]
    return "1 seed (no replicate)" if n == 1 else f"{n} seeds"


def verdict(delta: float, p_adj: float) -> str:
    """"no detectable effect" unless the Holm-adjusted p is below α; then which way it goes."""
    if math.isnan(p_adj) or p_adj >= ALPHA:
        return "no detectable effect"
    return "better (significant after Holm)" if delta > 0 else "worse (significant after Holm)"


def effect_sentence(row: pd.Series, metric: str) -> str:
    """"sigmoid vs softmax (loss): Δ AUROC −0.024 [−0.051, +0.004], p_adj 0.41, 3 seeds: no detectable effect"."""
    change = f"{short_name(row['axis'], row['value'])} vs {short_name(row['axis'], row['baseline_value'])}"
    name = _metric_name(metric)
    if "p_value" not in row or pd.isna(row.get("p_value")):
        if int(row["n_pairs"]) == 0:
            return f"{change} ({row['axis']}): no matched cells, no estimate."
        return (f"{change} ({row['axis']}): mean Δ {name} {number(row['mean_delta'], signed=True)} over "
                f"{int(row['n_pairs'])} matched pair(s), untested (no predictions to resample).")
    return (f"{change} ({row['axis']}): Δ {name} {with_ci(row['delta'], row['ci_low'], row['ci_high'], signed=True)}, "
            f"p_adj {p_value(row['p_adj'])}, {_seeds(row['n_seeds'])}: {verdict(row['delta'], row['p_adj'])}.")


def detectable_sentence(effects: pd.DataFrame, comparisons: pd.DataFrame, metric: str) -> str | None:
    """The smallest Δ this matrix could have detected (80 % power, α 0.05, two-sided, from the observed
    variance) for a main effect and for one configuration against the baseline; None when nothing was tested."""
    name = _metric_name(metric)
    parts = []
    if "mde" in effects and effects["mde"].notna().any():
        by_axis = ", ".join(f"{axis} {number(mde)}" for axis, mde in
                            effects.dropna(subset=["mde"]).groupby("axis", sort=False)["mde"].min().items())
        parts.append(f"{number(effects['mde'].min())} for a main effect ({by_axis})")
    if "mde" in comparisons and comparisons["mde"].notna().any():
        parts.append(f"{number(float(np.nanmedian(comparisons['mde'])))} for one configuration against the "
                     "baseline (median over configurations)")
    if not parts:
        return None
    return (f"Smallest detectable |Δ {name}| (80 % power, α 0.05 two-sided before the Holm adjustment, from the "
            f"observed seed and volume variance): {'; '.join(parts)}. A \"no detectable effect\" means an effect, "
            "if any, is likely smaller than this, not that there is none.")


def control_sentence(control: dict | None, metric: str) -> str:
    """What the SA / SDPA negative control found (or why it was not evaluated)."""
    if control is None:
        return ("Negative control: not evaluated (the matrix has no SDPA and standard-attention cells that are "
                "otherwise identical).")
    name = _metric_name(metric)
    if control.get("passed") is None:
        return (f"Negative control (SDPA vs SA attention, the same math, {control['n_pairs']} matched pair(s)): "
                "not tested (no predictions to resample).")
    interval = with_ci(control["delta"], control["ci_low"], control["ci_high"], signed=True)
    head = (f"Negative control (SDPA vs SA attention, the same math, {control['n_pairs']} matched pair(s), "
            f"{_seeds(control['n_seeds'])}): Δ {name} {interval}")
    if control["passed"]:
        return f"{head}; the CI contains 0: passed."
    return (f"{head}; the CI excludes 0: FAILED. Two kernels of the same computation differ beyond noise — "
            "check numerics and determinism before trusting the other effects (a true null fails this check "
            "1 time in 20).")
