"""The report's readouts (zero-shot, linear probe), its selectable main metric, and per-run replicates of it.

A metric key is ``<readout>_<metric>``: ``zeroshot_auroc`` (the default),
``probe_auroc``, ``zeroshot_f1``, ... Each readout has its logged metrics
(``<readout>_auroc``, ``<readout>_auroc_ci_low``, ...) and a predictions
artifact with columns VolumeName, pathology, score, label (one row per
validation volume × pathology), from which the report's two-level bootstrap
recomputes the metric on resampled volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.effects import Replicates, run_resamples_many
from core.data.pathologies import PATHOLOGIES
from core.metrics import METRICS as BOOTSTRAP_METRICS
from core.registry import ConfigError, closest

READOUTS = {"zeroshot": "zeroshot_predictions.csv", "probe": "probe_predictions.csv"}
READOUT_NAMES = {"zeroshot": "zero-shot", "probe": "linear probe"}
METRIC_KEYS = tuple(f"{readout}_{metric}" for readout in READOUTS for metric in BOOTSTRAP_METRICS)
DEFAULT_METRIC = "zeroshot_auroc"


def parse_metric(key: str) -> tuple[str, str]:
    """(readout, metric) of a metric key ("probe_auroc" → ("probe", "auroc")); an unknown key is a
    ``ConfigError`` naming the closest valid one and listing them all."""
    if key not in METRIC_KEYS:
        raise ConfigError(f"unknown report metric '{key}'{closest(key, METRIC_KEYS)} "
                          f"(valid metrics: {', '.join(METRIC_KEYS)})")
    readout, metric = key.split("_", 1)
    return readout, metric


def other_readout(readout: str) -> str:
    """The readout shown beside ``readout`` in the main table (zero-shot ↔ probe)."""
    return next(r for r in READOUTS if r != readout)


def _wide(predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labels, scores) as volume × pathology frames from a long predictions CSV."""
    labels = predictions.pivot(index="VolumeName", columns="pathology", values="label")
    scores = predictions.pivot(index="VolumeName", columns="pathology", values="score")
    return labels, scores


def pathology_order(names: list[str]) -> list[str]:
    """CT-RATE's pathology order, unknown names after it."""
    known = [p for p in PATHOLOGIES if p in names]
    return known + [n for n in names if n not in known]


def build_replicates(runs: pd.DataFrame, predictions: Mapping[str, pd.DataFrame | None], metric_key: str,
                     n: int = 1000, seed: int = 0,
                     also: Sequence[str] = ()) -> tuple[dict[str, Replicates] | None, list[str], dict]:
    """The two-level bootstrap of ``metric_key`` (and of the readout's metrics in ``also``: "f1", ...) over the
    runs that have predictions for its readout; replicates are keyed by metric name ("auroc").

    ``predictions`` maps run id → the readout's predictions frame (None when the run lacks it). All runs are
    scored on the volumes and pathologies they share (with both classes present); runs whose labels differ
    on those volumes are left out. Returns (replicates or None, notes, info) where info holds n_volumes,
    n_pathologies, protocol and the run ids used.
    """
    readout, metric = parse_metric(metric_key)
    artifact = READOUTS[readout]
    notes: list[str] = []
    have = [row for row in runs.itertuples() if predictions.get(row.run_id) is not None]
    missing = [f"{row.config} (run {row.run_id[:8]})" for row in runs.itertuples()
               if predictions.get(row.run_id) is None]
    if missing:
        notes.append(f"no {artifact} for {'; '.join(missing)}: left out of the {metric_key} CIs and tests")
    if not have:
        return None, notes, {}
    wide = {row.run_id: _wide(predictions[row.run_id]) for row in have}
    first_labels = wide[have[0].run_id][0]
    volumes, columns = first_labels.index, list(first_labels.columns)
    for labels, _ in wide.values():
        volumes = volumes.intersection(labels.index)
        columns = [c for c in columns if c in labels.columns]
    columns = pathology_order(columns)
    reference = first_labels.loc[volumes, columns]
    kept = []
    for row in have:
        if wide[row.run_id][0].loc[volumes, columns].equals(reference):
            kept.append(row)
        else:
            notes.append(f"{row.config} (run {row.run_id[:8]}): its labels differ from the other runs' on the same "
                         f"volumes (a different evaluation set); left out of the {metric_key} tests")
    columns = [c for c in columns if reference[c].nunique() == 2]  # one-class pathologies leave every macro mean
    if not kept or len(volumes) == 0 or not columns:
        notes.append(f"{metric_key}: no volume and pathology shared by the runs; no CIs or tests")
        return None, notes, {}
    protocols = [p for p in dict.fromkeys(row.protocol for row in kept) if isinstance(p, str)]
    protocol = protocols[0] if protocols else "ctclip"
    if len(protocols) > 1:
        notes.append(f"runs use different threshold protocols {protocols}; {metric_key} tests use {protocol}")
    labels = reference[columns].to_numpy(float)
    scores = [wide[row.run_id][1].loc[volumes, columns].to_numpy(float) for row in kept]
    names = list(dict.fromkeys([metric, *also]))
    values = run_resamples_many(labels, scores, names, protocol, n=n, seed=seed)
    if np.isnan(values[metric][0]).any():
        notes.append(f"{metric_key}: some runs' predictions give no value; no CIs or tests")
        return None, notes, {}
    replicates = {name: Replicates([row.config for row in kept], full, resampled, seed=seed)
                  for name, (full, resampled) in values.items() if not np.isnan(full).any()}
    info = {"n_volumes": len(volumes), "n_pathologies": len(columns), "protocol": protocol,
            "run_ids": [row.run_id for row in kept]}
    return replicates, notes, info
