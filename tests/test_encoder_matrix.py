"""The encoder comparison matrix (experiments/encoders.yaml) runs end to end on synthetic CT-RATE."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from core.cli import main
from core.tracking import find_runs
from experiments.matrix import load_matrix

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ROOT / "experiments" / "encoders.yaml"


def _short_copy(tmp_path: Path, data: Path) -> Path:
    """encoders.yaml with the same cells, its base resolved, and a training budget of a few steps."""
    spec = yaml.safe_load(ENCODERS.read_text())
    spec["base"] = str((ENCODERS.parent / spec["base"]).resolve())
    spec["overrides"] = {
        **spec.get("overrides", {}),
        "data.root": str(data / "root"), "data.cache_dir": str(data / "cache"), "data.num_workers": 0,
        "train.max_steps": 3, "train.batch_size": 4, "train.output_dir": str(tmp_path / "runs"),
        "train.checkpoint_every": 0, "eval.batch_size": 8, "eval.bootstrap": 0,
    }
    path = tmp_path / "encoders.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_runnable_encoder_cell_finishes_with_zero_shot_metrics(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "data" / "root"), "--train", "16", "--valid", "12",
                 "--seed", "5", "--no-progress"]) == 0
    path = _short_copy(tmp_path, tmp_path / "data")
    matrix = load_matrix(path)
    assert {c.config.model.encoder for c in matrix.runnable} == {
        "ctvit", "vit3d", "hybrid", "convnext3d", "poolformer3d", "dcformer_nano", "dcformer_naive", "dcformer_tiny"}
    skipped = [c for c in matrix.cells if not c.runnable]
    assert [c.config.model.encoder for c in skipped] == ["convnext3d"]

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "core.cli", "matrix", "run", str(path), "--tracking-uri", uri,
                           "--storage", storage, "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = find_runs(uri, "tags.matrix = 'encoders' and tags.`ctlab.kind` = 'train'")
    by_cell = {r.data.tags["cell_id"]: r for r in runs}
    assert len(runs) == len(by_cell) == len(matrix.runnable)  # one run per cell, none for the skipped one
    client = MlflowClient(uri)
    for cell in matrix.runnable:
        run = by_cell[cell.cell_id]
        assert run.info.status == "FINISHED", (cell.label, run.data.tags.get("failure_reason"))
        assert run.data.params["model.encoder"] == cell.config.model.encoder
        assert 0.0 <= run.data.metrics["zeroshot_auroc"] <= 1.0
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert skipped[0].cell_id not in by_cell

    status = subprocess.run([sys.executable, "-m", "core.cli", "matrix", "status", str(path), "--tracking-uri", uri,
                             "--storage", storage], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"{len(matrix.runnable)} done" in status.stdout and "1 skipped" in status.stdout
    assert "has no attention axis" in status.stdout
