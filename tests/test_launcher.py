"""The matrix launcher's bookkeeping on real stores (Optuna SQLite storage, MLflow SQLite tracking), in seconds.

A cell is claimed by exactly one worker; its state follows its trial (running, done, failed with the
reason, pending again after a dead worker); a cell with a FINISHED run is never trained again; orphaned
runs are closed; one parent run per matrix carries the counts and the failed and skipped cells; a failing
cell is recorded and the matrix goes on. A few cells here really train for a step on the synthetic set (a
resumed cell, a NaN cell in-process and under torchrun); the end-to-end matrix runs (kill -9 and resume, two
workers, bad data) are in tests/test_matrix_run.py.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from core.data.cache import index_path
from core.registry import ConfigError
from core.tracking import Tracker, find_runs, get_client
from core.train import NonFiniteLossError, train
from experiments.launcher import (
    CLAIM_PREFIX,
    PARENT_PREFIX,
    CellSampler,
    LaunchOptions,
    _enqueue_if_unreachable,
    _record_failure,
    cell_states,
    close_orphans,
    finished_run,
    launch,
    log_progress,
    matrix_summary,
    open_storage,
    open_study,
    parent_run_id,
    prepare_data,
    run_cell,
    run_names,
    try_claim,
    work,
)
from experiments.matrix import Matrix, load_matrix

EXPERIMENT = "launcher-test"


@pytest.fixture(scope="module")
def empty_tracking_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made (its migrations take seconds), copied for each test."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    get_client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def opts(tmp_path, empty_tracking_store) -> LaunchOptions:
    shutil.copy(empty_tracking_store, tmp_path / "mlflow.db")
    return LaunchOptions(storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         progress=False)


def _matrix(tmp_path: Path, name: str = "lm", root: Path | None = None, cache: Path | None = None,
            **fields) -> Matrix:
    """Four runnable cells (attention × seed) and one skipped (a conv encoder given an attention).

    Without ``root`` the data folder does not exist, so a cell that really starts training fails at once.
    """
    base = {"model": {"preset": "tiny", "text_encoder": "tiny-random"},
            "data": {"root": str(root or tmp_path / "no-data"), "cache_dir": str(cache or tmp_path / "cache"),
                     "target_shape": [16, 32, 32], "num_workers": 0},
            "train": {"output_dir": str(tmp_path / "runs"), "lr": 0.001},
            "tracking": {"uri": f"sqlite:///{tmp_path}/elsewhere.db", "experiment": EXPERIMENT}}
    data = {"name": name, "base": base,
            "axes": {"model.attention": ["standard", "sdpa"], "train.seed": [0, 1], "train.lr": [0.001]},
            "include": [{"model.encoder": "convnext3d", "model.attention": "sdpa"}], **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_matrix(path)


def _cell(matrix: Matrix, attention: str, seed: int):
    return next(c for c in matrix.runnable if c.config.model.attention == attention and c.config.train.seed == seed)


def _finished(uri: str, matrix: str, cell_id: str, auroc: float) -> str:
    """A FINISHED training run of the cell (what a worker leaves behind), with its zero-shot AUROC."""
    tracker = Tracker(uri, EXPERIMENT, tags={"matrix": matrix, "cell_id": cell_id, "ctlab.kind": "train"})
    tracker.log_metrics({"zeroshot_auroc": auroc}, step=3)
    tracker.finish()
    return tracker.run_id


def _train_runs(uri: str, matrix: str = "lm") -> list:
    return find_runs(uri, f"tags.matrix = '{matrix}' and tags.`ctlab.kind` = 'train'")


def test_a_cell_is_claimed_once_and_its_state_follows_its_trial(tmp_path, opts):
    matrix = _matrix(tmp_path)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    a, b, c = _cell(matrix, "standard", 0), _cell(matrix, "standard", 1), _cell(matrix, "sdpa", 0)
    [skipped] = [cell for cell in matrix.cells if not cell.runnable]
    assert cell_states(matrix, storage, study) == {
        **{cell.cell_id: ("pending", "") for cell in matrix.runnable},
        skipped.cell_id: ("skipped", skipped.skip_reason)}
    assert "has no attention axis" in skipped.skip_reason

    # a claim of the same cell in another matrix (same config, same cell id) is not this matrix's claim
    other = _matrix(tmp_path, name="lm2")
    other_study = open_study(other, storage)
    assert try_claim(storage, other, other_study, a.cell_id, other_study.ask().number)
    assert cell_states(matrix, storage, study)[a.cell_id] == ("pending", "")

    trial = study.ask()
    assert try_claim(storage, matrix, study, a.cell_id, trial.number)
    assert not try_claim(storage, matrix, study, a.cell_id, trial.number + 1)  # held by the first worker
    claims = {s.study_name: s.user_attrs for s in storage.get_all_studies()
              if s.study_name.startswith(f"{CLAIM_PREFIX}/lm/")}
    assert claims == {f"{CLAIM_PREFIX}/lm/{a.cell_id}/0000": {"worker": f"{socket.gethostname()}:{os.getpid()}",
                                                            "trial_number": trial.number}}
    states = cell_states(matrix, storage, study)
    assert states[a.cell_id] == ("running", f"{socket.gethostname()}:{os.getpid()}")
    assert states[b.cell_id] == ("pending", "")
    study.tell(trial, 0.7)
    assert cell_states(matrix, storage, study)[a.cell_id] == ("done", "")
    assert not try_claim(storage, matrix, study, a.cell_id, study.ask().number)  # done: never again

    failing = study.ask()
    assert try_claim(storage, matrix, study, b.cell_id, failing.number)
    failing.set_user_attr("failure_reason", "NonFiniteLossError: loss is nan at step 2")
    study.tell(failing, state=TrialState.FAIL)
    assert cell_states(matrix, storage, study)[b.cell_id] == ("failed", "NonFiniteLossError: loss is nan at step 2")
    assert not try_claim(storage, matrix, study, b.cell_id, study.ask().number)

    dead = study.ask()  # a worker that died: its trial failed (stale heartbeat) without a reason
    assert try_claim(storage, matrix, study, c.cell_id, dead.number)
    study.tell(dead, state=TrialState.FAIL)
    assert cell_states(matrix, storage, study)[c.cell_id] == ("pending", "retry after attempt 1")
    retry = study.ask()
    assert try_claim(storage, matrix, study, c.cell_id, retry.number)
    assert storage.get_study_user_attrs(storage.get_study_id_from_name(
        f"{CLAIM_PREFIX}/lm/{c.cell_id}/0001"))["trial_number"] == retry.number
    assert cell_states(matrix, storage, study)[c.cell_id][0] == "running"  # the latest attempt decides
    study.tell(retry, 0.6)
    assert cell_states(matrix, storage, study)[c.cell_id] == ("done", "")


class _ClaimRace:
    """The storage as a worker sees it when another worker claims the same cell between this worker's state
    check and its own claim: ``rival`` runs just before this worker's claim study is created."""

    def __init__(self, storage, rival) -> None:
        self.storage, self.rival = storage, rival

    def __getattr__(self, name: str):
        return getattr(self.storage, name)

    def create_new_study(self, *args, **kwargs):
        rival, self.rival = self.rival, None
        if rival is not None:
            rival()
        return self.storage.create_new_study(*args, **kwargs)


def test_a_worker_that_loses_the_race_for_a_cell_does_not_train_it(tmp_path, opts):
    matrix = _matrix(tmp_path)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    cell = matrix.runnable[0].cell_id
    mine, theirs = study.ask(), study.ask()
    race = _ClaimRace(storage, lambda: try_claim(storage, matrix, study, cell, theirs.number))
    assert try_claim(race, matrix, study, cell, mine.number) is False
    [claim] = [s for s in storage.get_all_studies() if s.study_name.startswith(f"{CLAIM_PREFIX}/lm/{cell}/")]
    assert claim.user_attrs["trial_number"] == theirs.number


def test_a_worker_that_stops_beating_loses_its_cell_after_the_grace_period(tmp_path, opts):
    opts = dataclasses.replace(opts, heartbeat_s=2, grace_s=1)  # Optuna's own grace would be 2 x 2 s
    matrix = _matrix(tmp_path)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    dead = study.ask()
    cell = dead.suggest_categorical("cell", sorted(c.cell_id for c in matrix.runnable))
    assert try_claim(storage, matrix, study, cell, dead.number)
    storage.record_heartbeat(dead._trial_id)  # its last beat
    time.sleep(2)
    optuna.storages.fail_stale_trials(study)  # what each worker's loop runs
    assert cell_states(matrix, storage, study)[cell] == ("pending", "retry after attempt 1")
    [retry] = [t for t in study.get_trials() if t.state == TrialState.WAITING]  # queued again for its cell
    assert (retry.params, retry.system_attrs["failed_trial"]) == ({"cell": cell}, dead.number)


@pytest.mark.postgres
def test_a_worker_goes_on_after_the_database_server_drops_its_connections(tmp_path, postgres_db):
    import psycopg

    uri = postgres_db()
    matrix = _matrix(tmp_path)
    storage = open_storage(LaunchOptions(storage=uri, progress=False))
    study = open_study(matrix, storage)
    cell = matrix.runnable[0].cell_id
    assert cell_states(matrix, storage, study)[cell] == ("pending", "")  # the pool now holds a connection
    server, database = uri.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:  # an idle timeout, a failover, a restart
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
    assert try_claim(storage, matrix, study, cell, study.ask().number)
    assert cell_states(matrix, storage, study)[cell][0] == "running"


def test_a_claim_for_a_trial_not_yet_in_the_study_counts_as_running(tmp_path, opts):
    matrix = _matrix(tmp_path)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    cell = matrix.runnable[0]
    assert try_claim(storage, matrix, study, cell.cell_id, 999)
    assert cell_states(matrix, storage, study)[cell.cell_id][0] == "running"


def test_study_has_one_grid_point_per_runnable_cell(tmp_path, opts):
    matrix = _matrix(tmp_path)
    study = open_study(matrix, open_storage(opts))
    assert isinstance(study.sampler, CellSampler)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.study_name == "lm"
    assert study.sampler._search_space == {"cell": sorted(c.cell_id for c in matrix.runnable)}
    assert open_study(matrix, open_storage(opts))._study_id == study._study_id  # reopened, not duplicated


def test_run_names_tell_cells_apart_and_the_summary_lists_failed_and_skipped_cells(tmp_path):
    matrix = _matrix(tmp_path)
    names = run_names(matrix)
    a, b, c, d = (_cell(matrix, "standard", 0), _cell(matrix, "standard", 1), _cell(matrix, "sdpa", 0),
                  _cell(matrix, "sdpa", 1))
    [skipped] = [cell for cell in matrix.cells if not cell.runnable]
    # the seed varies, so it is in the name; lr is an axis with one value, so it is not
    assert names == {a.cell_id: "SA+GEGLU+LN · softmax · seed 0", b.cell_id: "SA+GEGLU+LN · softmax · seed 1",
                     c.cell_id: "SDPA+GEGLU+LN · softmax · seed 0", d.cell_id: "SDPA+GEGLU+LN · softmax · seed 1",
                     skipped.cell_id: "convnext3d SDPA+GELU+LN · softmax · seed 0"}
    states = {a.cell_id: ("done", ""), b.cell_id: ("failed", "OOM at step 3"), c.cell_id: ("failed", ""),
              d.cell_id: ("running", "host:1"), skipped.cell_id: ("skipped", skipped.skip_reason)}
    assert matrix_summary(matrix, states) == "\n".join([
        "Matrix **lm**: 5 cells — 1 done, 2 failed, 1 skipped, 1 running",
        "", "**Failed cells**", "",
        f"- SA+GEGLU+LN · softmax · seed 1 (`{b.cell_id}`): OOM at step 3",
        f"- SDPA+GEGLU+LN · softmax · seed 0 (`{c.cell_id}`): no reason recorded",
        "", "**Skipped cells**", "",
        f"- convnext3d SDPA+GELU+LN · softmax · seed 0 (`{skipped.cell_id}`): {skipped.skip_reason}"])
    pending = {cell.cell_id: ("pending", "") for cell in matrix.cells}
    assert matrix_summary(matrix, pending) == "Matrix **lm**: 5 cells — 5 pending"


def test_run_names_show_a_nested_axis_by_its_last_key(tmp_path):
    """``model.encoder_args.codebook_size`` reads as "codebook_size 16", not "encoder_args.codebook_size 16"."""
    matrix = _matrix(tmp_path, axes={"model.encoder_args.codebook_size": [0, 16]}, include=[])
    assert sorted(run_names(matrix).values()) == ["SDPA+GEGLU+LN · softmax · codebook_size 0",
                                                  "SDPA+GEGLU+LN · softmax · codebook_size 16"]


def test_one_parent_run_per_matrix_with_its_cells_and_file(tmp_path, opts):
    matrix = _matrix(tmp_path)
    storage = open_storage(opts)
    parent = parent_run_id(matrix, storage, opts.tracking_uri)
    assert parent_run_id(matrix, storage, opts.tracking_uri) == parent  # found, not created again
    assert [r.info.run_id for r in find_runs(opts.tracking_uri, "tags.matrix = 'lm'")] == [parent]
    run = get_client(opts.tracking_uri).get_run(parent)
    assert run.info.run_name == "lm" and run.info.status == "RUNNING"
    assert get_client(opts.tracking_uri).get_experiment(run.info.experiment_id).name == EXPERIMENT
    tags = run.data.tags
    assert (tags["ctlab.kind"], tags["matrix"]) == ("matrix", "lm")
    assert (tags["cells_total"], tags["cells_skipped"]) == ("5", "1")
    states = {c.cell_id: ("pending", "") if c.runnable else ("skipped", c.skip_reason) for c in matrix.cells}
    assert tags["mlflow.note.content"] == matrix_summary(matrix, states)
    assert [a.path for a in get_client(opts.tracking_uri).list_artifacts(parent)] == ["lm.yaml"]
    attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(f"{PARENT_PREFIX}/lm"))
    assert attrs == {"run_id": parent}


def test_a_worker_that_loses_the_parent_race_takes_the_winners_run(tmp_path, opts):
    matrix = _matrix(tmp_path, name="raced")
    storage = open_storage(opts)
    claim = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], f"{PARENT_PREFIX}/raced")
    storage.set_study_user_attr(claim, "run_id", "run-of-the-winner")
    assert parent_run_id(matrix, storage, opts.tracking_uri) == "run-of-the-winner"
    assert find_runs(opts.tracking_uri, "tags.matrix = 'raced'") == []


def test_a_worker_that_loses_the_parent_race_waits_for_the_winners_run(tmp_path, opts):
    """The winner has claimed the parent but not yet created its run: the loser waits for it, never makes one."""
    import threading

    matrix = _matrix(tmp_path, name="raced")
    storage = open_storage(opts)
    claim = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], f"{PARENT_PREFIX}/raced")
    found: list[str] = []
    loser = threading.Thread(target=lambda: found.append(parent_run_id(matrix, storage, opts.tracking_uri)))
    loser.start()
    time.sleep(1.0)
    storage.set_study_user_attr(claim, "run_id", "run-of-the-winner")
    loser.join(timeout=30)
    assert found == ["run-of-the-winner"]
    assert find_runs(opts.tracking_uri, "tags.matrix = 'raced'") == []


def test_a_matrix_with_every_cell_skipped_still_gets_a_parent_run_saying_why(tmp_path, opts):
    matrix = _matrix(tmp_path, axes={})  # only the included conv-encoder cell, which takes no attention axis
    [skipped] = matrix.cells
    assert not matrix.runnable
    run = get_client(opts.tracking_uri).get_run(parent_run_id(matrix, open_storage(opts), opts.tracking_uri))
    assert run.data.tags["cells_skipped"] == "1"
    assert skipped.skip_reason in run.data.tags["mlflow.note.content"]


def test_a_matrix_rerun_on_a_new_optuna_storage_keeps_its_parent_run(tmp_path, opts):
    """The parent is found in the MLflow store first, so a fresh Optuna storage does not start a second one."""
    matrix = _matrix(tmp_path)
    first = parent_run_id(matrix, open_storage(opts), opts.tracking_uri)
    fresh = dataclasses.replace(opts, storage=f"sqlite:///{tmp_path}/optuna-new.db")
    assert parent_run_id(matrix, open_storage(fresh), opts.tracking_uri) == first
    assert len(find_runs(opts.tracking_uri, "tags.matrix = 'lm' and tags.`ctlab.kind` = 'matrix'")) == 1


def test_cell_states_cover_the_cells_after_a_skipped_one(tmp_path, opts):
    matrix = _matrix(tmp_path, axes={"model.encoder": ["convnext3d", "ctvit"], "model.attention": ["sdpa"]},
                     include=[])
    skipped, runnable = matrix.cells  # the conv encoder, which takes no attention axis, comes first
    assert not skipped.runnable and runnable.runnable
    storage = open_storage(opts)
    assert cell_states(matrix, storage, open_study(matrix, storage)) == {
        skipped.cell_id: ("skipped", skipped.skip_reason), runnable.cell_id: ("pending", "")}


def test_a_cell_with_a_finished_run_is_not_trained_again(tmp_path, opts):
    matrix = _matrix(tmp_path)  # no data: training would fail
    cell, other = matrix.runnable[:2]
    assert finished_run(cell, matrix, opts.tracking_uri) is None
    _finished(opts.tracking_uri, "another-matrix", cell.cell_id, 0.9)  # the same cell in another matrix
    _finished(opts.tracking_uri, "lm", other.cell_id, 0.8)
    killed = Tracker(opts.tracking_uri, EXPERIMENT, tags={"matrix": "lm", "cell_id": cell.cell_id})
    killed.kill()
    assert finished_run(cell, matrix, opts.tracking_uri) is None
    run_id = _finished(opts.tracking_uri, "lm", cell.cell_id, 0.75)
    assert finished_run(cell, matrix, opts.tracking_uri).info.run_id == run_id
    before = {r.info.run_id for r in find_runs(opts.tracking_uri, "")}
    assert run_cell(cell, matrix, "parent", opts) == 0.75
    assert {r.info.run_id for r in find_runs(opts.tracking_uri, "")} == before


def test_orphaned_running_runs_of_the_cell_are_marked_killed(tmp_path, opts):
    matrix = _matrix(tmp_path)
    cell, other = matrix.runnable[:2]

    def running(matrix_name: str, cell_id: str) -> str:
        return Tracker(opts.tracking_uri, EXPERIMENT, tags={"matrix": matrix_name, "cell_id": cell_id}).run_id

    orphan, other_cell = running("lm", cell.cell_id), running("lm", other.cell_id)
    other_matrix = running("x", cell.cell_id)
    done = _finished(opts.tracking_uri, "lm", cell.cell_id, 0.5)
    close_orphans(cell, matrix, opts.tracking_uri)
    client = get_client(opts.tracking_uri)
    assert {r: client.get_run(r).info.status for r in (orphan, other_cell, other_matrix, done)} == {
        orphan: "KILLED", other_cell: "RUNNING", other_matrix: "RUNNING", done: "FINISHED"}


def test_a_cell_retried_after_its_worker_died_closes_the_dead_run_and_records_its_own_failure(tmp_path, opts):
    matrix = _matrix(tmp_path)  # no data: this attempt fails before its training run exists
    cell = matrix.runnable[0]
    dead = Tracker(opts.tracking_uri, EXPERIMENT, tags={"matrix": "lm", "cell_id": cell.cell_id,
                                                        "ctlab.kind": "train"}).run_id  # still RUNNING
    with pytest.raises(ConfigError, match="data.root"):
        run_cell(cell, matrix, "parent-id", opts)
    runs = {r.info.run_id: r for r in find_runs(opts.tracking_uri, f"tags.cell_id = '{cell.cell_id}'")}
    assert runs.pop(dead).info.status == "KILLED"
    [failed] = runs.values()
    assert failed.info.status == "FAILED" and failed.data.tags["failure_reason"].startswith("ConfigError: data.root")


def test_progress_counts_cells_on_the_parent_and_finishes_it_when_all_are_resolved(tmp_path, opts):
    matrix = _matrix(tmp_path)
    parent = parent_run_id(matrix, open_storage(opts), opts.tracking_uri)
    a, b, c, d = matrix.runnable
    [skipped] = [cell for cell in matrix.cells if not cell.runnable]
    states = {a.cell_id: ("done", ""), b.cell_id: ("failed", "boom"), c.cell_id: ("running", "h:1"),
              d.cell_id: ("pending", ""), skipped.cell_id: ("skipped", "no attention axis")}
    log_progress(matrix, states, parent, opts.tracking_uri)
    client = get_client(opts.tracking_uri)
    run = client.get_run(parent)
    assert run.info.status == "RUNNING"
    assert (run.data.tags["cells_failed"], run.data.tags["cells_skipped"]) == ("1", "1")
    assert run.data.tags["mlflow.note.content"] == matrix_summary(matrix, states)
    logged = {k: [(m.step, m.value) for m in client.get_metric_history(parent, f"cells_{k}")]
              for k in ("done", "failed", "skipped", "running", "pending")}
    assert logged == {"done": [(3, 1)], "failed": [(3, 1)], "skipped": [(3, 1)], "running": [(3, 1)],
                      "pending": [(3, 1)]}
    states.update({c.cell_id: ("done", ""), d.cell_id: ("done", "")})
    log_progress(matrix, states, parent, opts.tracking_uri)
    assert client.get_run(parent).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "cells_done")] == [(3, 1), (5, 3)]


def test_rerunning_a_finished_matrix_trains_nothing_and_finishes_its_parent(tmp_path, opts):
    matrix = _matrix(tmp_path)  # no data: a cell that really started training would fail
    aurocs = {cell.cell_id: 0.5 + i / 10 for i, cell in enumerate(matrix.runnable)}
    runs = {_finished(opts.tracking_uri, "lm", cid, auroc) for cid, auroc in aurocs.items()}
    [skipped] = [cell for cell in matrix.cells if not cell.runnable]
    states = work(matrix, opts)
    assert states == {**{cid: ("done", "") for cid in aurocs}, skipped.cell_id: ("skipped", skipped.skip_reason)}
    assert {r.info.run_id for r in _train_runs(opts.tracking_uri)} == runs  # no new run
    study = optuna.load_study(study_name="lm", storage=opts.storage)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted((t.params["cell"], t.value) for t in study.trials) == sorted(aurocs.items())  # each cell once
    [parent] = find_runs(opts.tracking_uri, "tags.matrix = 'lm' and tags.`ctlab.kind` = 'matrix'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {"cells_done": 4, "cells_failed": 0, "cells_skipped": 1, "cells_running": 0,
                                   "cells_pending": 0}
    assert work(matrix, opts) == states  # and again: nothing left to do
    assert len(optuna.load_study(study_name="lm", storage=opts.storage).trials) == 4


def test_a_cell_that_fails_before_training_is_recorded_and_the_matrix_goes_on(tmp_path, opts):
    matrix = _matrix(tmp_path, axes={"model.attention": ["standard", "sdpa"]}, include=[])
    good, bad = _cell(matrix, "standard", 0), _cell(matrix, "sdpa", 0)
    _finished(opts.tracking_uri, "lm", good.cell_id, 0.7)
    states = work(matrix, opts)  # the bad cell has no data to train on
    reason = states[bad.cell_id][1]
    assert states == {good.cell_id: ("done", ""), bad.cell_id: ("failed", reason)}
    assert reason.startswith("ConfigError: data.root") and "does not exist" in reason
    [failed] = [r for r in _train_runs(opts.tracking_uri) if r.data.tags["cell_id"] == bad.cell_id]
    [parent] = find_runs(opts.tracking_uri, "tags.matrix = 'lm' and tags.`ctlab.kind` = 'matrix'")
    assert failed.info.status == "FAILED" and failed.data.tags["failure_reason"] == reason
    assert failed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert failed.data.tags["cell_label"] == bad.label and failed.info.run_name == run_names(matrix)[bad.cell_id]
    assert failed.data.params["model.attention"] == "sdpa"
    trials = optuna.load_study(study_name="lm", storage=opts.storage).trials
    assert [t.user_attrs["failure_reason"] for t in trials if t.state == TrialState.FAIL] == [reason]
    assert parent.info.status == "FINISHED" and parent.data.tags["cells_failed"] == "1"
    assert "**Failed cells**" in parent.data.tags["mlflow.note.content"]


@pytest.mark.parametrize(("nproc", "error", "message"), [
    (1, NonFiniteLossError, "loss is nan"),
    # a worker holding 2 devices trains the cell as 2 DDP ranks; its error names rank 0's
    (2, RuntimeError, "torchrun --nproc_per_node=2 exited with status 1 .*: rank 0 failed with NonFiniteLossError"),
], ids=["in-process", "torchrun"])
def test_a_cell_that_fails_in_training_keeps_its_training_run_as_its_one_failed_run(
        tmp_path, opts, synthetic_source, shared_cache, monkeypatch, nproc, error, message):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # for torchrun's ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    matrix = _matrix(tmp_path, root=synthetic_source, cache=shared_cache, include=[],
                     axes={"model.attention": ["sdpa"], "model.logit_scale_init": [float("nan")],
                           "train.batch_size": [2]})
    [cell] = matrix.runnable
    parent = parent_run_id(matrix, open_storage(opts), opts.tracking_uri)
    with pytest.raises(error, match=message):
        run_cell(cell, matrix, parent, dataclasses.replace(opts, nproc_per_cell=nproc))
    [run] = find_runs(opts.tracking_uri, f"tags.cell_id = '{cell.cell_id}'")
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("NonFiniteLossError")
    assert "config_id" in run.data.tags  # the run train() opened, not one added after it
    assert (run.data.tags["mlflow.parentRunId"], run.data.tags["matrix"], run.data.tags["cell_label"]) == (
        parent, "lm", cell.label)


def test_a_cell_whose_worker_died_after_its_last_checkpoint_resumes_that_run(
        tmp_path, opts, synthetic_source, shared_cache, capfd):
    matrix = _matrix(tmp_path, root=synthetic_source, cache=shared_cache, include=[],
                     axes={"model.attention": ["sdpa"], "train.batch_size": [2], "train.max_steps": [1]})
    [cell] = matrix.runnable
    cfg = copy.deepcopy(cell.config)
    cfg.tracking.uri = opts.tracking_uri
    first = train(cfg, progress=False)  # trained and checkpointed; its worker died before recording the cell
    get_client(opts.tracking_uri).set_terminated(first.run_id, status="KILLED")
    capfd.readouterr()
    auroc = run_cell(cell, matrix, "parent-id", opts)
    assert "%|" not in capfd.readouterr().err  # no progress bar in a worker's log when it was asked for none
    [run] = _train_runs(opts.tracking_uri)
    assert (run.info.run_id, run.info.status) == (first.run_id, "FINISHED")
    assert auroc == run.data.metrics["zeroshot_auroc"]


def test_a_failure_is_recorded_once(tmp_path, opts):
    """A failing cell gets a FAILED run with the reason, unless its training run of this attempt exists."""
    matrix = _matrix(tmp_path)
    cell = matrix.runnable[0]
    cfg = cell.config
    cfg.tracking.uri, cfg.tracking.run_name = opts.tracking_uri, "cell run"
    tags = {"matrix": "lm", "cell_id": cell.cell_id, "cell_label": cell.label}
    earlier = Tracker(opts.tracking_uri, EXPERIMENT, tags=tags)
    earlier.kill()  # an earlier attempt, ended before this one started
    time.sleep(0.01)
    started = int(time.time() * 1000)
    other = matrix.runnable[1]  # another cell's run, started meanwhile by another worker: not this cell's
    Tracker(opts.tracking_uri, EXPERIMENT, tags={**tags, "cell_id": other.cell_id})
    _record_failure(cell, matrix, "parent-id", cfg, tags, "ConfigError: bad", started)
    recorded = [r for r in find_runs(opts.tracking_uri, f"tags.matrix = 'lm' and tags.cell_id = '{cell.cell_id}'")
                if r.info.run_id != earlier.run_id]
    assert [(r.info.status, r.data.tags["failure_reason"], r.data.tags["mlflow.parentRunId"], r.info.run_name,
             r.data.tags["ctlab.kind"], r.data.tags["cell_id"]) for r in recorded] == [
        ("FAILED", "ConfigError: bad", "parent-id", "cell run", "train", cell.cell_id)]
    assert recorded[0].data.params["model.attention"] == cfg.model.attention

    time.sleep(0.01)
    started = int(time.time() * 1000)
    resumed = Tracker(opts.tracking_uri, EXPERIMENT, run_id=earlier.run_id)  # this attempt's run: resumed, failed
    resumed.fail("NonFiniteLossError")
    _record_failure(cell, matrix, "parent-id", cfg, tags, "NonFiniteLossError", started)
    time.sleep(0.01)
    started = int(time.time() * 1000)
    fresh = Tracker(opts.tracking_uri, EXPERIMENT, tags=tags)  # this attempt's new run, still open
    _record_failure(cell, matrix, "parent-id", cfg, tags, "OOM", started)
    assert len(find_runs(opts.tracking_uri, f"tags.matrix = 'lm' and tags.cell_id = '{cell.cell_id}'")) == 3
    assert fresh.run_id


def test_a_retried_cell_the_sampler_considers_visited_is_queued_once(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", sampler=CellSampler({"cell": ["a", "b"]}),
                                direction="maximize")
    trial = study.ask()
    tried = trial.suggest_categorical("cell", ["a", "b"])
    study.tell(trial, state=TrialState.FAIL)
    untried = ({"a", "b"} - {tried}).pop()
    _enqueue_if_unreachable(study, [untried])
    assert study.get_trials(states=(TrialState.WAITING,)) == []  # the sampler proposes an unvisited cell itself
    _enqueue_if_unreachable(study, [untried, tried])
    _enqueue_if_unreachable(study, [untried, tried])
    [waiting] = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"] == {"cell": tried}
    study.optimize(lambda t: float(len(t.suggest_categorical("cell", ["a", "b"]))), n_trials=1)
    assert study.trials[-1].params["cell"] == tried


def test_prepare_data_caches_each_distinct_data_config_once(tmp_path, synthetic_source):
    matrix = _matrix(tmp_path, root=synthetic_source, axes={"data.hu_window": [[-1000, 1000], [-1000, 200]],
                                                            "train.seed": [0, 1]}, include=[])
    prepare_data(matrix, progress=False)
    configs = {repr(c.config.data): c.config.data for c in matrix.runnable}
    assert len(configs) == 2
    for data in configs.values():
        assert index_path(data, "train").is_file() and index_path(data, "valid").is_file()
    assert len({index_path(d, "train").parent.parent for d in configs.values()}) == 2


def test_prepare_data_prepares_only_the_splits_the_cells_read(tmp_path, synthetic_source):
    """A matrix evaluating on train (no valid split read) leaves the valid split unprepared: on CT-RATE that
    split is thousands of volumes."""
    matrix = _matrix(tmp_path, root=synthetic_source, axes={"eval.split": ["train"]}, include=[])
    prepare_data(matrix, progress=False)
    [cell] = matrix.runnable
    assert index_path(cell.config.data, "train").is_file()
    assert not index_path(cell.config.data, "valid").exists()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache for the launch tests (preparing the synthetic set takes seconds)."""
    return tmp_path_factory.mktemp("cache")


def test_launch_in_one_process_prepares_the_data_and_runs_the_matrix_in_the_given_stores(
        tmp_path, opts, synthetic_source, shared_cache, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may be logged to a default store here
    matrix = _matrix(tmp_path, root=synthetic_source, cache=shared_cache, axes={"model.attention": ["sdpa"]},
                     include=[])
    [cell] = matrix.runnable
    run = _finished(opts.tracking_uri, "lm", cell.cell_id, 0.8)
    assert launch(matrix, opts) == 0
    assert index_path(cell.config.data, "train").is_file() and index_path(cell.config.data, "valid").is_file()
    assert [r.info.run_id for r in _train_runs(opts.tracking_uri)] == [run]
    [parent] = find_runs(opts.tracking_uri, "tags.matrix = 'lm' and tags.`ctlab.kind` = 'matrix'")
    assert parent.info.status == "FINISHED"
    [trial] = optuna.load_study(study_name="lm", storage=opts.storage).trials
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.8)
    assert list((tmp_path / "cwd").iterdir()) == [] and not (tmp_path / "elsewhere.db").exists()


def test_several_workers_need_the_matrix_file(tmp_path, opts, synthetic_source, shared_cache):
    matrix = _matrix(tmp_path, root=synthetic_source, cache=shared_cache, axes={"model.attention": ["sdpa"]},
                     include=[])
    with pytest.raises(ValueError, match="matrix file path"):
        launch(matrix, opts, workers=2)


@pytest.mark.slow
def test_two_worker_processes_rerun_a_finished_matrix_without_training(tmp_path, opts, synthetic_source,
                                                                       shared_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    matrix = _matrix(tmp_path, root=synthetic_source, cache=shared_cache,
                     axes={"model.attention": ["standard", "sdpa"]}, include=[])
    runs = {_finished(opts.tracking_uri, "lm", c.cell_id, 0.6) for c in matrix.runnable}
    opts.heartbeat_s, opts.grace_s = 2, 4
    assert launch(matrix, opts, workers=2, matrix_path=matrix.path) == 0
    assert {r.info.run_id for r in _train_runs(opts.tracking_uri)} == runs
    [parent] = find_runs(opts.tracking_uri, "tags.matrix = 'lm' and tags.`ctlab.kind` = 'matrix'")
    assert parent.info.status == "FINISHED"
    assert not (tmp_path / "elsewhere.db").exists()  # the workers logged where they were told


def test_a_worker_with_nothing_pending_waits_for_another_workers_running_cell(tmp_path, opts):
    """It stays (to take the cell over should that worker die) and leaves once the cell is done."""
    import threading

    matrix = _matrix(tmp_path, axes={"model.attention": ["standard", "sdpa"]}, include=[])
    done, held = _cell(matrix, "standard", 0), _cell(matrix, "sdpa", 0)
    _finished(opts.tracking_uri, "lm", done.cell_id, 0.7)
    storage = open_storage(opts)
    study = open_study(matrix, storage)
    other = study.ask()  # another worker's trial, training the held cell
    assert try_claim(storage, matrix, study, held.cell_id, other.number)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(work(matrix, dataclasses.replace(opts, heartbeat_s=1))))
    worker.start()
    # the worker has resolved the other cell once the parent run counts it; it then finds nothing to claim
    deadline = time.time() + 120
    while not [r for r in find_runs(opts.tracking_uri, "tags.`ctlab.kind` = 'matrix'")
               if r.data.metrics.get("cells_done") == 1] and time.time() < deadline:
        time.sleep(0.2)
    worker.join(timeout=3)  # a few of its 1 s polls of the running cell
    assert worker.is_alive() and not result  # waiting, not gone
    study.tell(other, 0.6)
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert result == {done.cell_id: ("done", ""), held.cell_id: ("done", "")}
    assert len(_train_runs(opts.tracking_uri)) == 1  # it trained nothing itself
