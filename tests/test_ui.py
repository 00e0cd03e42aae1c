"""The MLflow UI really shows a matrix: `ctlab ui` serves it and headless Chromium finds the child runs."""

import os
import shutil
import subprocess
import sys

import pytest

from analysis.ui_snapshot import free_port, render_runs_page, wait_for_http
from core.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_ui_lists_matrix_child_runs(tmp_path, monkeypatch):
    if shutil.which("chromium") is None:
        if os.environ.get("CTLAB_REQUIRE_SERVICES"):
            pytest.fail("CTLAB_REQUIRE_SERVICES is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = Tracker(uri, "uitest", run_name="uitest", tags={"ctlab.kind": "matrix", "matrix": "uitest"})
    names = ["uitest-0a1b2c3d4e5f", "uitest-9f8e7d6c5b4a"]
    for name in names:
        child = Tracker(uri, "uitest", run_name=name, parent_run_id=parent.run_id,
                        tags={"ctlab.kind": "train", "matrix": "uitest", "cell_id": name[-12:]})
        child.log_metrics({"zeroshot_auroc": 0.7}, step=1)
        child.finish()
    parent.finish()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "core.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=180)
        experiment_id = parent.client.get_experiment_by_name("uitest").experiment_id
        text = render_runs_page(f"http://127.0.0.1:{port}", experiment_id, tmp_path / "ui.png")
    finally:
        os.killpg(server.pid, 15)
        output = server.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in output  # ctlab ui printed its URL
    for name in names:
        assert name in text, f"{name} not shown; page text: {text[:1500]}"
    assert (tmp_path / "ui.png").stat().st_size > 20_000
