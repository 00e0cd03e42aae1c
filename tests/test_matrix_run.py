"""Reliability of `ctlab matrix run`: kill -9 and rerun, two workers, failing cells, bad files — on SQLite and
PostgreSQL (tracking store and Optuna storage)."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from core.cli import main
from core.tracking import find_runs
from experiments.matrix import load_matrix
from tests.run_fixtures import tiny_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small synthetic CT-RATE, written once for the module."""
    folder = tmp_path_factory.mktemp("synthetic")
    assert main(["data", "synth", "--out", str(folder / "root"), "--train", "12", "--valid", "8", "--seed", "3"]) == 0
    return folder


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request, tmp_path) -> tuple[str, str]:
    """(tracking URI, Optuna storage) on SQLite files, or on two databases of the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    create = request.getfixturevalue("postgres_db")
    return create(), create()


def _matrix(tmp_path: Path, base: dict, **fields) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"name": "reliability", "base": base, **fields}))
    return path


def _command(path: Path, stores: tuple[str, str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "core.cli", "matrix", "run", str(path), "--tracking-uri", stores[0],
            "--storage", stores[1], "--heartbeat", "1", "--grace", "3", "--no-progress", *extra]


def _cell_runs(stores: tuple[str, str]) -> list:
    return find_runs(stores[0], "tags.matrix = 'reliability' and tags.`ctlab.kind` = 'train'")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_killed_matrix_resumes_and_finishes_each_cell_once(synthetic, stores, tmp_path):
    out = tmp_path / "runs"
    path = _matrix(tmp_path, tiny_run(synthetic, out, steps=30, checkpoint_every=2),
                   axes={"model.attention": ["standard", "sdpa"]})
    cells = load_matrix(path).runnable
    proc = subprocess.Popen(_command(path, stores), cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = [out / c.cell_id / "checkpoints" / "last.pt" for c in cells]
    deadline = time.time() + 240
    while not any(p.exists() for p in checkpoints) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"matrix ended before its first checkpoint: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = next(c for c, p in zip(cells, checkpoints, strict=True) if p.exists())
    from core.checkpoint import load_checkpoint

    saved = load_checkpoint(out / killed.cell_id / "checkpoints" / "last.pt")
    killed_step, killed_run = saved["position"]["step"], saved["run_id"]
    assert 0 < killed_step < 30 and killed_run

    rerun_ms = int(time.time() * 1000)
    rerun = subprocess.run(_command(path, stores), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = _cell_runs(stores)
    finished = Counter(r.data.tags["cell_id"] for r in runs if r.info.status == "FINISHED")
    assert finished == {c.cell_id: 1 for c in cells}
    # resume is resume: the killed cell has one run, the one its checkpoint recorded, continued after the checkpoint
    killed_runs = [r for r in runs if r.data.tags["cell_id"] == killed.cell_id]
    assert [r.info.run_id for r in killed_runs] == [killed_run], "the killed cell was restarted in a new run"
    resumed = killed_runs[0]
    assert resumed.info.run_id == killed_run and resumed.info.status == "FINISHED"
    client = MlflowClient(stores[0])
    history = client.get_metric_history(resumed.info.run_id, "train_loss")
    after = sorted(m.step for m in history if m.timestamp >= rerun_ms)
    assert after[0] == killed_step + 1, f"the rerun logged steps {after} after a checkpoint at step {killed_step}"
    assert after == list(range(killed_step + 1, 31))  # every remaining step once, nothing repeated
    steps = [m.step for m in history]
    assert max(steps) == 30 and set(range(1, 31)) <= set(steps)
    for run in runs:
        if run.info.status == "FINISHED":
            history = client.get_metric_history(run.info.run_id, "zeroshot_auroc")
            assert len(history) == 1  # one evaluation, nothing duplicated
            assert run.data.params["model.attention"] in {"standard", "sdpa"}


def _logged(client: MlflowClient, runs: list) -> dict[str, int]:
    """How many values each cell run has logged, over all its metrics."""
    return {r.info.run_id: sum(len(client.get_metric_history(r.info.run_id, key)) for key in r.data.metrics)
            for r in runs}


def test_rerunning_a_finished_matrix_trains_nothing(synthetic, tmp_path):
    stores = (f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db")
    out = tmp_path / "runs"
    path = _matrix(tmp_path, tiny_run(synthetic, out, steps=2), axes={"model.mlp": ["gelu", "swiglu"]})
    assert main(_command(path, stores)[3:]) == 0
    client = MlflowClient(stores[0])
    first = _cell_runs(stores)
    assert len(first) == 2 and all(r.info.status == "FINISHED" for r in first)
    before, checkpoints = _logged(client, first), {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert all(before.values()) and checkpoints

    assert main(_command(path, stores)[3:]) == 0
    again = _cell_runs(stores)
    assert {r.info.run_id for r in again} == {r.info.run_id for r in first}  # no new run
    assert _logged(client, again) == before  # no step, no evaluation logged
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == checkpoints  # no checkpoint rewritten


def test_two_workers_share_the_cells(synthetic, stores, tmp_path):
    path = _matrix(tmp_path, tiny_run(synthetic, tmp_path / "runs", steps=3),
                   axes={"model.norm": ["layernorm", "rmsnorm"], "model.loss": ["clip", "siglip"]})
    result = subprocess.run(_command(path, stores, "--workers", "2"), cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _cell_runs(stores)
    ids = {c.cell_id for c in load_matrix(path).runnable}
    assert Counter(r.data.tags["cell_id"] for r in runs) == {cid: 1 for cid in ids}  # each trained exactly once
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = find_runs(stores[0], "tags.matrix = 'reliability' and tags.`ctlab.kind` = 'matrix'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent[0].info.run_id}


def test_nan_cell_and_corrupt_volume_are_recorded_and_the_rest_finish(synthetic, tmp_path):
    stores = (f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db")
    corrupt_root = tmp_path / "corrupt-root"
    subprocess.run(["cp", "-r", str(synthetic / "root"), str(corrupt_root)], check=True)
    victim = sorted((corrupt_root / "train").rglob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    path = _matrix(tmp_path, tiny_run(synthetic, tmp_path / "runs", steps=3), include=[
        {"model.attention": "sdpa"},
        {"model.attention": "standard"},
        {"model.attention": "sdpa", "model.logit_scale_init": float("nan")},
        {"model.attention": "sdpa", "train.seed": 1,  # a cell id is the config, not where its data lives
         "data.root": str(corrupt_root), "data.cache_dir": str(tmp_path / "cache2")},
    ])
    assert main(_command(path, stores)[3:]) == 0
    runs = {r.data.tags["cell_id"]: r for r in _cell_runs(stores)}
    cells = load_matrix(path).runnable
    nan_cell, corrupt_cell = cells[2], cells[3]
    assert runs[nan_cell.cell_id].info.status == "FAILED"
    assert "NonFiniteLossError" in runs[nan_cell.cell_id].data.tags["failure_reason"]
    assert runs[corrupt_cell.cell_id].info.status == "FINISHED"
    assert runs[corrupt_cell.cell_id].data.tags["skipped_inputs"] == "1"
    assert runs[corrupt_cell.cell_id].data.metrics["skipped_inputs"] == 1
    assert all(runs[c.cell_id].info.status == "FINISHED" for c in cells[:2])


def test_bad_matrix_fails_before_any_run(synthetic, tmp_path, capsys):
    stores = (f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db")
    path = _matrix(tmp_path, tiny_run(synthetic, tmp_path / "runs", steps=3),
                   axes={"model.attention": ["standard", "sdpaa"]})
    assert main(_command(path, stores)[3:]) == 2
    assert "did you mean 'sdpa'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() or _cell_runs(stores) == []
