"""The state of every cell of a matrix, from the Optuna storage and the MLflow store."""

from __future__ import annotations

import pandas as pd

from core.tracking import find_runs
from experiments.launcher import LaunchOptions, cell_states, open_storage, open_study
from experiments.matrix import Matrix

KEY_METRICS = ("zeroshot_auroc", "zeroshot_f1", "step_ms")


def status_table(matrix: Matrix, opts: LaunchOptions) -> pd.DataFrame:
    """One row per cell: id, label, state, detail (failure reason / worker), key metrics of its latest run."""
    storage = open_storage(opts)
    states = cell_states(matrix, storage, open_study(matrix, storage))
    runs = find_runs(opts.tracking_uri, f"tags.matrix = '{matrix.name}' and tags.`ctlab.kind` = 'train'")
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        latest[run.data.tags.get("cell_id")] = run
    rows = []
    for cell in matrix.cells:
        state, detail = states[cell.cell_id]
        run = latest.get(cell.cell_id)
        metrics = run.data.metrics if run else {}
        rows.append({"cell": cell.cell_id, "config": cell.label, "state": state, "detail": detail,
                     **{k: metrics.get(k) for k in KEY_METRICS}})
    return pd.DataFrame(rows)


def print_status(matrix: Matrix, opts: LaunchOptions) -> pd.DataFrame:
    """Print the status table with counts per state; returns it."""
    table = status_table(matrix, opts)
    counts = table["state"].value_counts().to_dict()
    print(f"matrix '{matrix.name}': " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    with pd.option_context("display.max_colwidth", 60, "display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    return table
