"""Run a matrix on any number of workers that share one Optuna RDB storage and one MLflow store.

The matrix is an Optuna study whose GridSampler proposes the cells. A
GridSampler alone can hand the same cell to two workers at once, so before
training a worker *claims* the cell: it creates a study named
``ctlab-claim/<matrix>/<cell>/<attempt>`` in the same database. Study names
are unique there, so exactly one worker's insert succeeds, on SQLite and on
PostgreSQL alike. RDB heartbeats mark a killed worker's trial FAILED after
the grace period; ``RetryHeartbeatStaleTrialCallback`` enqueues it again, and
the next claim attempt resumes the cell from its last checkpoint. A cell
with a FINISHED MLflow run is never trained again, even if the study was
deleted. A failing cell (NaN loss, bad data, OOM) is recorded with its reason
and the matrix goes on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from core.config import config_to_dict, flatten
from core.naming import component_values, run_name
from core.tracking import DESCRIPTION_TAG, FINISHED, Tracker, find_runs, get_client
from experiments.matrix import Cell, Matrix
from experiments.slurm_env import slurm_identity, worker_detail

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
CLAIM_PREFIX = "ctlab-claim"
PARENT_PREFIX = "ctlab-parent"


@dataclass
class LaunchOptions:
    """Where the matrix's shared state lives and how workers behave."""

    storage: str = "sqlite:///optuna.db"
    tracking_uri: str | None = None
    heartbeat_s: int = 10
    grace_s: int = 30
    max_retry: int = 3
    progress: bool = True
    nproc_per_cell: int = 1  # > 1: each cell trains under torchrun --nproc_per_node N (a multi-GPU worker)


def open_storage(opts: LaunchOptions) -> RDBStorage:
    """The shared Optuna RDB storage, with heartbeats so a killed worker's cell becomes work again."""
    return RDBStorage(
        opts.storage,
        heartbeat_interval=opts.heartbeat_s,
        grace_period=opts.grace_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=opts.max_retry),
        engine_kwargs={"pool_pre_ping": True},
    )


class CellSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler over cell ids, minus its habit of stopping the study after a trial.

    Workers run one trial per ``optimize`` call and decide themselves when the
    matrix is done (see ``work``). GridSampler's own stop check also reads a
    ``grid_id`` that enqueued trials (retried cells) do not have, and raises
    KeyError when such a trial ends with exactly one grid point unvisited.
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        """Nothing to do: the worker loop, not the sampler, ends the matrix."""


def open_study(matrix: Matrix, storage: RDBStorage) -> optuna.Study:
    """The matrix's study: one grid point per runnable cell, maximising zero-shot AUROC."""
    ids = sorted(c.cell_id for c in matrix.runnable)
    sampler = CellSampler({"cell": ids}, seed=0)
    return optuna.create_study(study_name=matrix.name, storage=storage, sampler=sampler, direction="maximize",
                               load_if_exists=True)


# ------------------------------------------------------------------ claims


def _claims(storage: RDBStorage, matrix: str) -> dict[str, list[Any]]:
    """Claim studies per cell id, oldest attempt first."""
    prefix = f"{CLAIM_PREFIX}/{matrix}/"
    out: dict[str, list[Any]] = {}
    for study in sorted(storage.get_all_studies(), key=lambda s: s.study_name):
        if study.study_name.startswith(prefix):
            cell_id = study.study_name[len(prefix):].split("/")[0]
            out.setdefault(cell_id, []).append(study)
    return out


def cell_states(matrix: Matrix, storage: RDBStorage, study: optuna.Study) -> dict[str, tuple[str, str]]:
    """Each cell's (state, detail): done, running, failed (reason), pending or skipped."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    claims = _claims(storage, matrix.name)
    states: dict[str, tuple[str, str]] = {}
    for cell in matrix.cells:
        if not cell.runnable:
            states[cell.cell_id] = ("skipped", cell.skip_reason or "")
            continue
        attempts = claims.get(cell.cell_id, [])
        if not attempts:
            states[cell.cell_id] = ("pending", "")
            continue
        owner = attempts[-1].user_attrs.get("trial_number")
        trial = trials.get(owner)
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
            states[cell.cell_id] = ("running", worker_detail(attempts[-1].user_attrs))
        elif trial.state == TrialState.COMPLETE:
            states[cell.cell_id] = ("done", "")
        elif "failure_reason" in trial.user_attrs:
            states[cell.cell_id] = ("failed", trial.user_attrs["failure_reason"])
        else:  # the worker died (stale heartbeat) or was interrupted: work again
            states[cell.cell_id] = ("pending", f"retry after attempt {len(attempts)}")
    return states


def try_claim(storage: RDBStorage, matrix: Matrix, study: optuna.Study, cell_id: str, trial_number: int) -> bool:
    """Atomically take ``cell_id`` for ``trial_number``; False when another worker holds or finished it."""
    state, _ = cell_states(matrix, storage, study)[cell_id]
    if state != "pending":
        return False
    attempt = len(_claims(storage, matrix.name).get(cell_id, []))
    name = f"{CLAIM_PREFIX}/{matrix.name}/{cell_id}/{attempt:04d}"
    try:
        claim_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    storage.set_study_user_attr(claim_id, "worker", f"{socket.gethostname()}:{os.getpid()}")
    storage.set_study_user_attr(claim_id, "trial_number", trial_number)
    for key, value in slurm_identity().items():  # which SLURM job and node hold the cell
        storage.set_study_user_attr(claim_id, key, value)
    return True


# ------------------------------------------------------------------ MLflow side

_COMPONENT_KEYS = {f"model.{axis}" for axis in ("encoder", "attention", "norm", "mlp", "loss", "adaptation")}


def run_names(matrix: Matrix) -> dict[str, str]:
    """Each cell's run name in the UI: its configuration ("SA+GELU+LN · softmax"), then every other axis the
    matrix varies ("· seed 1" when seeds repeat, "· lr 0.001"); the cell id stays a tag."""
    flat = {c.cell_id: flatten(config_to_dict(c.config)) for c in matrix.cells}
    keys = dict.fromkeys(k for c in matrix.cells for k in c.assignment if k not in _COMPONENT_KEYS)
    varied = [k for k in keys if len({str(f.get(k)) for f in flat.values()}) > 1]
    return {cid: run_name(component_values(f), {k.rsplit(".", 1)[-1]: f.get(k) for k in varied})
            for cid, f in flat.items()}


def matrix_summary(matrix: Matrix, states: dict[str, tuple[str, str]]) -> str:
    """The parent run's description: cell counts, then each failed and skipped cell with its reason."""
    names = run_names(matrix)
    counts = {s: sum(1 for v in states.values() if v[0] == s) for s in ("done", "failed", "skipped", "running",
                                                                       "pending")}
    lines = [f"Matrix **{matrix.name}**: {len(matrix.cells)} cells — "
             + ", ".join(f"{n} {state}" for state, n in counts.items() if n)]
    for state in ("failed", "skipped"):
        cells = [(names[cid], cid, detail) for cid, (s, detail) in states.items() if s == state]
        if cells:
            lines += ["", f"**{state.capitalize()} cells**", ""]
            lines += [f"- {name} (`{cid}`): {detail or 'no reason recorded'}" for name, cid, detail in cells]
    return "\n".join(lines)


def parent_run_id(matrix: Matrix, storage: RDBStorage, tracking_uri: str | None) -> str:
    """The matrix's parent MLflow run: found, or created by exactly one worker (same claim trick)."""
    name = f"{PARENT_PREFIX}/{matrix.name}"
    existing = find_runs(tracking_uri, f"tags.matrix = '{matrix.name}' and tags.`ctlab.kind` = 'matrix'")
    if existing:
        return existing[0].info.run_id
    try:
        claim_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
    except optuna.exceptions.DuplicatedStudyError:
        for _ in range(600):
            attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
            if "run_id" in attrs:
                return attrs["run_id"]
            time.sleep(0.1)
        raise RuntimeError(f"no parent run appeared for matrix '{matrix.name}' in 60 s") from None
    cfg = matrix.runnable[0].config if matrix.runnable else matrix.cells[0].config
    states = {c.cell_id: ("pending", "") if c.runnable else ("skipped", c.skip_reason or "") for c in matrix.cells}
    tracker = Tracker(tracking_uri or cfg.tracking.uri, cfg.tracking.experiment, run_name=matrix.name,
                      tags={"ctlab.kind": "matrix", "matrix": matrix.name, "cells_total": len(matrix.cells),
                            "cells_skipped": len(matrix.cells) - len(matrix.runnable),
                            DESCRIPTION_TAG: matrix_summary(matrix, states)})
    if matrix.path is not None:
        tracker.log_artifact(matrix.path)
    storage.set_study_user_attr(claim_id, "run_id", tracker.run_id)
    return tracker.run_id


def finished_run(cell: Cell, matrix: Matrix, tracking_uri: str | None) -> Any | None:
    """The cell's FINISHED MLflow run, if it has one."""
    runs = find_runs(tracking_uri, f"tags.cell_id = '{cell.cell_id}' and tags.matrix = '{matrix.name}'",
                     statuses=(FINISHED,))
    return runs[0] if runs else None


def close_orphans(cell: Cell, matrix: Matrix, tracking_uri: str | None) -> None:
    """Mark RUNNING runs of a cell KILLED: their worker is gone (a resumed run is reopened by its checkpoint)."""
    client = get_client(tracking_uri)
    for run in find_runs(tracking_uri, f"tags.cell_id = '{cell.cell_id}' and tags.matrix = '{matrix.name}'",
                         statuses=("RUNNING",)):
        client.set_terminated(run.info.run_id, status="KILLED")


def log_progress(matrix: Matrix, states: dict[str, tuple[str, str]], parent: str, tracking_uri: str | None) -> None:
    """Counts of done / failed / skipped / pending cells on the parent run, its description listing failed and
    skipped cells with why; FINISHED once all are resolved."""
    counts = {s: sum(1 for v in states.values() if v[0] == s) for s in ("done", "failed", "skipped", "running",
                                                                       "pending")}
    tracker = Tracker(tracking_uri, "", run_id=parent)
    tracker.set_tags({DESCRIPTION_TAG: matrix_summary(matrix, states), "cells_failed": counts["failed"],
                      "cells_skipped": counts["skipped"]})
    resolved = counts["done"] + counts["failed"] + counts["skipped"]
    tracker.log_metrics({f"cells_{k}": v for k, v in counts.items()}, step=resolved)
    if resolved == len(matrix.cells):
        tracker.finish()


# ------------------------------------------------------------------ the worker


def run_cell(cell: Cell, matrix: Matrix, parent: str, opts: LaunchOptions) -> float:
    """Train one claimed cell (resuming its checkpoint if any) and return its zero-shot AUROC."""
    from core.train import train

    if (run := finished_run(cell, matrix, opts.tracking_uri)) is not None:
        log.info("cell %s (%s) already has FINISHED run %s; not training it again", cell.cell_id, cell.label,
                 run.info.run_id)
        return float(run.data.metrics.get("zeroshot_auroc", math.nan))
    close_orphans(cell, matrix, opts.tracking_uri)
    cfg = cell.config
    if opts.tracking_uri:
        cfg.tracking.uri = opts.tracking_uri
    cfg.tracking.run_name = run_names(matrix)[cell.cell_id]
    tags = {"matrix": matrix.name, "cell_id": cell.cell_id, "cell_label": cell.label, **slurm_identity()}
    started_ms = int(time.time() * 1000)
    try:
        if opts.nproc_per_cell > 1:
            from experiments.torchrun_cell import train_with_torchrun

            metrics = train_with_torchrun(cfg, opts.nproc_per_cell, parent, tags)
        else:
            metrics = train(cfg, resume=True, parent_run_id=parent, progress=opts.progress, tags=tags).metrics
    except Exception as err:
        _record_failure(cell, matrix, parent, cfg, tags, f"{type(err).__name__}: {err}", started_ms)
        raise
    return float(metrics.get("zeroshot_auroc", math.nan))


def _record_failure(cell: Cell, matrix: Matrix, parent: str, cfg: Any, tags: dict[str, str], reason: str,
                    started_ms: int) -> None:
    """A FAILED child run with the reason when the cell failed before its training run existed (bad data, a
    model that cannot be built), so every failed cell shows in the UI."""
    runs = find_runs(cfg.tracking.uri, f"tags.cell_id = '{cell.cell_id}' and tags.matrix = '{matrix.name}'")
    if any(r.info.start_time >= started_ms or (r.info.end_time or 0) >= started_ms for r in runs):
        return  # the training run (new, or resumed from a checkpoint) exists and recorded the failure itself
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                      parent_run_id=parent, tags={"ctlab.kind": "train", **tags})
    tracker.log_config(cfg)
    tracker.fail(reason)


def work(matrix: Matrix, opts: LaunchOptions) -> dict[str, tuple[str, str]]:
    """One worker: claim and train cells until every cell is done, failed or skipped; returns their states."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    parent = parent_run_id(matrix, storage, opts.tracking_uri)
    cells = {c.cell_id: c for c in matrix.runnable}

    def objective(trial: optuna.Trial) -> float:
        cell = cells[trial.suggest_categorical("cell", sorted(cells))]
        if not try_claim(storage, matrix, study, cell.cell_id, trial.number):
            raise optuna.TrialPruned(f"cell {cell.cell_id} is taken by another worker")
        trial.set_user_attr("cell_label", cell.label)
        log.info("worker %d: cell %s (%s)", os.getpid(), cell.cell_id, cell.label)
        try:
            return run_cell(cell, matrix, parent, opts)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            trial.set_user_attr("failure_reason", reason[:2000])
            log.warning("cell %s (%s) failed: %s", cell.cell_id, cell.label, reason)
            raise

    while True:
        optuna.storages.fail_stale_trials(study)
        states = cell_states(matrix, storage, study)
        pending = [cid for cid, (state, _) in states.items() if state == "pending"]
        running = [cid for cid, (state, _) in states.items() if state == "running"]
        if not pending and not running:
            break
        if not pending:
            time.sleep(min(opts.heartbeat_s, 5))  # wait for other workers, or for their heartbeat to go stale
            continue
        _enqueue_if_unreachable(study, pending)
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        log_progress(matrix, cell_states(matrix, storage, study), parent, opts.tracking_uri)
    log_progress(matrix, states, parent, opts.tracking_uri)
    return states


def _enqueue_if_unreachable(study: optuna.Study, pending: list[str]) -> None:
    """Queue a pending cell the GridSampler considers visited (e.g. a retried cell), so it is proposed."""
    trials = study.get_trials(deepcopy=False)
    waiting = {t.params.get("cell") or t.system_attrs.get("fixed_params", {}).get("cell")
               for t in trials if t.state == TrialState.WAITING}
    tried = {t.params.get("cell") for t in trials if t.state != TrialState.WAITING}
    for cell_id in pending:
        if cell_id in tried and cell_id not in waiting:
            study.enqueue_trial({"cell": cell_id}, skip_if_exists=False)
            return


def prepare_data(matrix: Matrix, progress: bool = True) -> None:
    """Preprocess every distinct data config of the matrix once, before workers start sharing the cache."""
    from core.data.cache import prepare

    done = set()
    for cell in matrix.runnable:
        key = repr(cell.config.data)
        if key not in done:
            done.add(key)
            prepare(cell.config.data, splits=("train", cell.config.eval.split), progress=progress)


def launch(matrix: Matrix, opts: LaunchOptions, workers: int = 1, matrix_path: Path | None = None) -> int:
    """Run ``workers`` worker processes on this machine (1 = in this process); returns an exit status."""
    prepare_data(matrix, opts.progress)
    storage = open_storage(opts)  # create both databases' tables here, not in racing workers
    open_study(matrix, storage)
    parent_run_id(matrix, storage, opts.tracking_uri)
    if workers <= 1:
        work(matrix, opts)
        return 0
    if matrix_path is None:
        raise ValueError("several workers need the matrix file path")
    command = [sys.executable, "-m", "core.cli", "matrix", "run", str(matrix_path), "--workers", "1",
               "--storage", opts.storage, "--heartbeat", str(opts.heartbeat_s), "--grace", str(opts.grace_s)]
    if opts.tracking_uri:
        command += ["--tracking-uri", opts.tracking_uri]
    if not opts.progress:
        command.append("--no-progress")
    procs = [subprocess.Popen(command) for _ in range(workers)]
    return max(p.wait() for p in procs)
