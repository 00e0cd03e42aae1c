import pandas as pd
import pytest
from mlflow import MlflowClient

from core.config import load_config
from core.tracking import Tracker, artifact_root, find_runs


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_run_is_readable_back(store, tmp_path):
    cfg = load_config(None, ["model.attention=standard", "train.lr=0.001"])
    tracker = Tracker(store, "exp", run_name="r1", tags={"matrix": "m", "cell_id": "c1"})
    tracker.log_config(cfg)
    tracker.log_metrics({"train_loss": 1.5, "lr": 1e-3}, step=1)
    tracker.log_metrics({"train_loss": 1.2, "bad": float("nan")}, step=2)
    tracker.log_dataframe(pd.DataFrame({"pathology": ["Cardiomegaly"], "auroc": [0.9]}), "zeroshot_per_label.csv")
    tracker.finish()

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.attention"] == "standard"
    assert float(run.data.params["train.lr"]) == pytest.approx(1e-3)
    assert run.data.tags["cell_id"] == "c1"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train_loss")] == [1.5, 1.2]
    assert "bad" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "zeroshot_per_label.csv"} <= names
    assert run.info.artifact_uri.startswith(artifact_root(store))
    assert [r.info.run_id for r in find_runs(store, "tags.matrix = 'm'")] == [tracker.run_id]


def test_failed_run_keeps_reason(store):
    tracker = Tracker(store, "exp")
    tracker.fail("NonFiniteLossError: loss is nan at step 3")
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "loss is nan" in run.data.tags["failure_reason"]


def test_disabled_tracker_logs_nothing(store):
    tracker = Tracker(store, "exp", enabled=False)
    tracker.log_metrics({"x": 1.0}, step=1)
    tracker.finish()
    assert find_runs(store, "") == []
