"""The MLflow UI really shows a matrix: a two-cell matrix run through the launcher, its report logged by
``ctlab report``, then ``ctlab ui`` served and walked with headless Chromium as a user would."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from analysis.ui_snapshot import browse_matrix, free_port, wait_for_http
from core.cli import main
from core.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.browser]
SOFTMAX, SIGMOID = "SA+GELU+LN · softmax", "SA+GELU+LN · sigmoid"


def _matrix(tmp_path: Path) -> Path:
    base = {
        "model": {"encoder": "ctvit", "preset": "tiny", "text_encoder": "tiny-random", "latent_dim": 32,
                  "attention": "standard", "norm": "layernorm", "mlp": "gelu",
                  "encoder_args": {"dim": 32, "patch": 8, "temporal_patch": 4, "heads": 2, "dim_head": 16}},
        "data": {"root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "target_shape": [16, 32, 32],
                 "target_spacing": [15.0, 9.0, 9.0], "num_workers": 0},
        "train": {"max_steps": 2, "epochs": 100, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1,
                  "output_dir": str(tmp_path / "runs")},
        "eval": {"bootstrap": 0, "batch_size": 8, "every_epoch": False},
        "tracking": {"system_metrics_interval_s": 0.1},  # each cell runs for about a second
    }
    path = tmp_path / "uitest.yaml"
    path.write_text(yaml.safe_dump({"name": "uitest", "base": base, "axes": {"model.loss": ["clip", "siglip"]}}))
    return path


def _need_chromium() -> None:
    if shutil.which("chromium") is None:
        if os.environ.get("CTLAB_REQUIRE_SERVICES"):
            pytest.fail("CTLAB_REQUIRE_SERVICES is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")


@contextmanager
def _served(uri: str, cwd: Path, output: list[str]) -> Iterator[str]:
    """``ctlab ui`` on ``uri`` for the block; yields its URL and appends what it printed to ``output``."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "core.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, 15)
        output.append(server.communicate(timeout=30)[0])


def test_matrix_is_readable_in_the_ui(tmp_path, monkeypatch):
    _need_chromium()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--train", "12", "--valid", "8", "--seed", "3"]) == 0
    assert main(["matrix", "run", str(_matrix(tmp_path)), "--tracking-uri", uri, "--storage",
                 f"sqlite:///{tmp_path}/optuna.db", "--no-progress"]) == 0
    assert main(["report", "--matrix", "uitest", "--tracking-uri", uri, "--out", str(tmp_path / "report"),
                 "--bootstrap", "20"]) == 0

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("uitest").experiment_id
    runs = client.search_runs([experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ctlab.kind") == "matrix")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {SOFTMAX, SIGMOID}
    for name, run in children.items():  # what the UI's columns and views read
        assert run.data.tags["loss"] == run.data.params["loss"] == ("siglip" if "sigmoid" in name else "clip")
        assert run.data.tags["attention"] == "standard" and run.data.tags["norm"] == "layernorm"
        assert len(run.data.tags["cell_id"]) == 12 and run.data.tags["cell_id"] not in name
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert json.loads(inputs["train"].profile)["num_volumes"] == 12
        assert json.loads(inputs["valid"].profile)["num_volumes"] == 8
        assert inputs["train"].digest == run.data.tags["data_fingerprint"]
        assert "system/cpu_utilization_percentage" in run.data.metrics
    assert parent.data.metrics["configurations"] == 2

    output: list[str] = []
    with _served(uri, tmp_path, output) as url:
        view = browse_matrix(url, experiment_id, parent.info.run_id, "tags.loss = 'siglip'",
                             tmp_path / "runs.png", tmp_path / "artifacts.png")
    assert url in output[0]  # ctlab ui printed its URL
    # nested: the children show only once the parent row is expanded, listed below it
    assert "uitest" in view.collapsed and SOFTMAX not in view.collapsed and SIGMOID not in view.collapsed
    table = view.expanded[view.expanded.index("Run Name"):]
    assert table.index("uitest") < table.index(SIGMOID) and table.index("uitest") < table.index(SOFTMAX), table[:800]
    for run in children.values():
        assert run.data.tags["cell_id"] not in view.expanded  # names, not hashes
    assert "data/train" in view.expanded  # the Dataset column: train split of data root "data"
    assert view.cut_names == []
    assert SIGMOID in view.searched and SOFTMAX not in view.searched, view.searched[:1500]
    assert "report.md" in view.artifacts and "figures" in view.artifacts and "tables" in view.artifacts
    assert "Ablation report: uitest" in view.report
    assert (tmp_path / "runs.png").stat().st_size > 20_000
    assert (tmp_path / "artifacts.png").stat().st_size > 20_000


def test_long_run_names_show_whole_in_the_runs_table(tmp_path, monkeypatch):
    """A name too long for the Run Name column's first width is not cut: "… · frozen_text · se…" would hide the
    seed that tells two runs of one configuration apart."""
    _need_chromium()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    names = [f"dcformer_nano SDPA+SwiGLU+RMSNorm · {loss} · frozen_text · seed {seed}"
             for loss in ("sigmoid", "softmax") for seed in (0, 1)]
    parent = Tracker(uri, "long", run_name="long", tags={"ctlab.kind": "matrix", "matrix": "long"})
    parent.log_text("# Ablation report: long\n", "report.md")
    for name in names:
        Tracker(uri, "long", run_name=name, parent_run_id=parent.run_id,
                tags={"loss": "siglip" if "sigmoid" in name else "clip"}).finish()
    parent.finish()
    experiment_id = MlflowClient(uri).get_experiment_by_name("long").experiment_id

    with _served(uri, tmp_path, []) as url:
        view = browse_matrix(url, experiment_id, parent.run_id, "tags.loss = 'siglip'")
    assert all(name in view.expanded for name in names)
    assert view.cut_names == [], view.cut_names  # the Run Name column was widened to fit every name
