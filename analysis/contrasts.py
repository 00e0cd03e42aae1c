"""Which configurations a comparison weighs: vs the baseline, main effects, two-way interactions, the SA/SDPA control.

Each function takes the configurations of a matrix (``configurations(runs)``:
one row per configuration, its ``component.<axis>`` and ``params.*``
columns) and returns contrasts: dicts with descriptive keys and
``weights`` ({configuration: weight}), Δ = Σ weight · metric. The statistics
(``analysis.effects``) evaluate them; nothing here looks at a metric.

Matched cells are identical in every component and every other param that
varies across the matrix and changes results, except the axis compared; the
seed is never part of a cell's context (seeds are replicates of one cell).
"""

from __future__ import annotations

import itertools

import pandas as pd

from core.config import NON_SEMANTIC_KEYS
from core.naming import AXES, SEARCH_AXES

_AXIS_PARAMS = (*(f"params.model.{axis}" for axis in AXES), *(f"params.{key}" for key in SEARCH_AXES),
                "params.train.seed")
CONTROL = ("attention", "standard", "sdpa")  # the same math by two kernels: their Δ must be 0


def configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (its first run's columns), in the runs' order."""
    return runs.drop_duplicates("config").reset_index(drop=True)


def context_columns(configs: pd.DataFrame) -> list[str]:
    """Columns two matched cells share: every component plus every other varying, result-changing param."""
    varying = [c for c in configs.columns if c.startswith("params.") and c not in _AXIS_PARAMS
               and not c[len("params."):].startswith(NON_SEMANTIC_KEYS) and configs[c].nunique(dropna=False) > 1]
    return [f"component.{axis}" for axis in AXES] + varying


def varying_axes(configs: pd.DataFrame) -> list[str]:
    """The component axes with more than one value among the configurations."""
    return [axis for axis in AXES if configs[f"component.{axis}"].nunique() > 1]


def baseline_contrasts(configs: pd.DataFrame, baseline: str) -> list[dict]:
    """Every configuration against the baseline: Δ = configuration − baseline."""
    return [{"config": c, "weights": {c: 1.0, baseline: -1.0}} for c in configs["config"] if c != baseline]


def _groups(configs: pd.DataFrame, exclude: list[str]) -> list[pd.DataFrame]:
    """Configurations grouped by every context column except ``exclude``."""
    others = [c for c in context_columns(configs) if c not in exclude]
    filled = configs[others].fillna("").astype(str)
    return [configs.loc[index] for index in filled.groupby(others, sort=False).groups.values()]


def _one(group: pd.DataFrame, values: dict[str, str]) -> str | None:
    match = pd.Series(True, index=group.index)
    for axis, value in values.items():
        match &= group[f"component.{axis}"] == value
    return str(group.loc[match, "config"].iloc[0]) if match.any() else None


def pair_contrast(configs: pd.DataFrame, axis: str, base_value: str, value: str) -> dict:
    """The main effect of ``value`` against ``base_value`` on ``axis``: the mean over matched cells of
    metric(value) − metric(base_value). ``pairs`` lists the (value cell, base cell) pairs used."""
    pairs = []
    for group in _groups(configs, [f"component.{axis}"]):
        on_value, on_base = _one(group, {axis: value}), _one(group, {axis: base_value})
        if on_value and on_base:
            pairs.append((on_value, on_base))
    weights: dict[str, float] = {}
    for on_value, on_base in pairs:
        weights[on_value] = weights.get(on_value, 0.0) + 1.0 / len(pairs)
        weights[on_base] = weights.get(on_base, 0.0) - 1.0 / len(pairs)
    return {"axis": axis, "baseline_value": base_value, "value": value, "n_pairs": len(pairs), "pairs": pairs,
            "weights": weights}


def main_effect_contrasts(configs: pd.DataFrame, baseline: str) -> list[dict]:
    """For each varying axis and each of its values other than the baseline's: ``pair_contrast``."""
    base_row = configs.loc[configs["config"] == baseline].iloc[0]
    out = []
    for axis in varying_axes(configs):
        base_value = str(base_row[f"component.{axis}"])
        for value in dict.fromkeys(configs[f"component.{axis}"].astype(str)):
            if value != base_value:
                out.append(pair_contrast(configs, axis, base_value, value))
    return out


def interaction_contrasts(configs: pd.DataFrame, baseline: str) -> list[dict]:
    """Two-way interactions: for axes a, b and values (v, w) other than the baseline's (a₀, b₀), the mean over
    matched sets of four cells of [m(v, w) − m(v, b₀)] − [m(a₀, w) − m(a₀, b₀)] (does changing a alter b's
    effect?). Only sets with all four cells count."""
    base_row = configs.loc[configs["config"] == baseline].iloc[0]
    out = []
    for axis_a, axis_b in itertools.combinations(varying_axes(configs), 2):
        a0, b0 = str(base_row[f"component.{axis_a}"]), str(base_row[f"component.{axis_b}"])
        values_a = [v for v in dict.fromkeys(configs[f"component.{axis_a}"].astype(str)) if v != a0]
        values_b = [v for v in dict.fromkeys(configs[f"component.{axis_b}"].astype(str)) if v != b0]
        groups = _groups(configs, [f"component.{axis_a}", f"component.{axis_b}"])
        for v, w in itertools.product(values_a, values_b):
            sets = []
            for group in groups:
                cells = [_one(group, {axis_a: x, axis_b: y}) for x, y in ((v, w), (v, b0), (a0, w), (a0, b0))]
                if all(cells):
                    sets.append(cells)
            weights: dict[str, float] = {}
            for cells in sets:
                for cell, sign in zip(cells, (1.0, -1.0, -1.0, 1.0), strict=True):
                    weights[cell] = weights.get(cell, 0.0) + sign / len(sets)
            if sets:
                out.append({"axis_a": axis_a, "value_a": v, "baseline_a": a0, "axis_b": axis_b, "value_b": w,
                            "baseline_b": b0, "n_sets": len(sets), "weights": weights})
    return out


def negative_control(configs: pd.DataFrame) -> dict | None:
    """SDPA against standard attention over matched cells (the same math: Δ must be 0); None when the matrix
    has no such pair."""
    axis, base_value, value = CONTROL
    column = f"component.{axis}"
    if column not in configs or not {base_value, value} <= set(configs[column].astype(str)):
        return None
    contrast = pair_contrast(configs, axis, base_value, value)
    return contrast if contrast["n_pairs"] else None
