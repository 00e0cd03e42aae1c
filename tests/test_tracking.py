import json
import time
from pathlib import Path

import pandas as pd
import pytest
import tomllib
from mlflow import MlflowClient

from core.config import load_config
from core.naming import axis_tags, run_name
from core.registry import ConfigError
from core.tracking import Tracker, artifact_root, find_runs
from experiments.launcher import LaunchOptions, open_storage, parent_run_id, run_cell, run_names
from experiments.matrix import load_matrix


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


# ---------------------------------------------------------------- what the MLflow UI shows


def test_config_axes_are_searchable_tags_and_params(store):
    cfg = load_config(None, ["model.attention=flash", "model.norm=rmsnorm", "model.mlp=swiglu",
                             "model.loss=siglip", "train.seed=3"])
    siglip = Tracker(store, "exp", run_name="a")
    siglip.log_config(cfg)
    clip = Tracker(store, "exp", run_name="b")
    clip.log_config(load_config(None, ["model.loss=clip"]))
    run = MlflowClient(store).get_run(siglip.run_id)
    expected = {"attention": "flash", "norm": "rmsnorm", "mlp": "swiglu", "loss": "siglip", "encoder": "ctvit",
                "seed": "3"}
    assert {k: run.data.tags[k] for k in expected} == expected
    assert {k: run.data.params[k] for k in expected} == expected
    assert [r.info.run_id for r in find_runs(store, "tags.loss = 'siglip'")] == [siglip.run_id]
    assert [r.info.run_id for r in find_runs(store, "params.loss = 'clip'")] == [clip.run_id]


def test_axis_a_conv_encoder_lacks_is_not_applicable():
    tags = axis_tags({"model.encoder": "dcformer_nano", "model.loss": "clip", "train.seed": 0})
    assert tags["attention"] == "n/a" and tags["encoder"] == "dcformer_nano" and tags["seed"] == "0"


def test_run_names_read_as_configurations():
    values = {"encoder": "ctvit", "attention": "flash", "mlp": "swiglu", "norm": "rmsnorm", "loss": "siglip",
              "adaptation": "full"}
    assert run_name(values) == "FA+SwiGLU+RMSNorm · sigmoid"
    assert run_name({**values, "encoder": "vit3d", "adaptation": "lora"}, {"seed": 2}) == \
        "vit3d FA+SwiGLU+RMSNorm · sigmoid · lora · seed 2"


def _matrix(**fields) -> dict:
    return {"name": "m", "base": {"model": {"preset": "tiny"}}, **fields}


def test_matrix_run_names_add_what_else_varies():
    repeated = load_matrix(_matrix(axes={"model.loss": ["clip", "siglip"]}, repeats=2))
    assert sorted(run_names(repeated).values()) == [f"SDPA+GEGLU+LN · {loss} · seed {seed}"
                                                    for loss in ("sigmoid", "softmax") for seed in (0, 1)]
    by_lr = load_matrix(_matrix(axes={"model.norm": ["layernorm", "rmsnorm"], "train.lr": [0.001, 0.0001]}))
    names = run_names(by_lr)
    assert len(set(names.values())) == 4 and "SDPA+GEGLU+RMSNorm · softmax · lr 0.0001" in names.values()
    plain = load_matrix(_matrix(axes={"model.loss": ["clip", "siglip"]}))
    assert sorted(run_names(plain).values()) == ["SDPA+GEGLU+LN · sigmoid", "SDPA+GEGLU+LN · softmax"]


def test_parent_run_lists_skipped_cells_with_why(store, tmp_path):
    matrix = load_matrix(_matrix(axes={"model.encoder": ["ctvit", "dcformer_nano"],
                                       "model.attention": ["standard", "sdpa"]}))
    skipped = [c for c in matrix.cells if not c.runnable]
    assert len(skipped) == 2
    parent = parent_run_id(matrix, open_storage(LaunchOptions(storage=f"sqlite:///{tmp_path}/optuna.db")), store)
    run = MlflowClient(store).get_run(parent)
    assert run.info.run_name == "m" and run.data.tags["cells_skipped"] == "2"
    description = run.data.tags["mlflow.note.content"]
    for cell in skipped:
        assert f"`{cell.cell_id}`): {cell.skip_reason}" in description
    assert "dcformer_nano SA" in description  # skipped cells named like runs


def test_failed_run_shows_its_reason_as_description(store):
    tracker = Tracker(store, "exp")
    tracker.fail("NonFiniteLossError: loss is nan at step 3")
    tags = MlflowClient(store).get_run(tracker.run_id).data.tags
    assert "loss is nan at step 3" in tags["mlflow.note.content"]


@pytest.mark.slow
def test_cell_failing_before_training_still_gets_a_failed_run(store, tmp_path):
    matrix = load_matrix(_matrix(axes={"model.loss": ["clip"]}, overrides={
        "data.root": str(tmp_path / "no-data"), "data.cache_dir": str(tmp_path / "cache"),
        "train.output_dir": str(tmp_path / "runs"), "model.text_encoder": "tiny-random"}))
    opts = LaunchOptions(storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=store, progress=False)
    parent = parent_run_id(matrix, open_storage(opts), store)
    with pytest.raises(Exception) as err:
        run_cell(matrix.cells[0], matrix, parent, opts)
    runs = find_runs(store, "tags.matrix = 'm' and tags.`ctlab.kind` = 'train'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].info.run_name == "SDPA+GEGLU+LN · softmax"
    assert runs[0].data.tags["mlflow.parentRunId"] == parent
    assert str(err.value) in runs[0].data.tags["failure_reason"]
    assert str(err.value) in runs[0].data.tags["mlflow.note.content"]


@pytest.mark.parametrize("interval", [0.2, None])
def test_system_metrics_are_sampled_only_when_on(store, interval):
    tracker = Tracker(store, "exp", system_metrics_s=interval)
    time.sleep(1.0)
    tracker.finish()
    metrics = MlflowClient(store).get_run(tracker.run_id).data.metrics
    sampled = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert sampled is (interval is not None)


def test_gpu_requirements_install_what_gpu_system_metrics_need():
    """``pip install -r requirements-gpu.txt`` (what the README tells a CUDA machine) installs the gpu extra,
    nvidia-ml-py included: without it MLflow's system metrics have no GPU utilisation or memory."""
    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    lines = (root / "requirements-gpu.txt").read_text().splitlines()
    listed = {line.split("#")[0].strip() for line in lines} - {""}
    assert "nvidia-ml-py>=12" in extra and set(extra) <= listed, sorted(set(extra) - listed)


def test_tracking_config_switches_system_metrics_off():
    assert load_config(None, []).tracking.system_metrics is True
    assert load_config(None, ["tracking.system_metrics=false"]).tracking.system_metrics is False
    with pytest.raises(ConfigError, match="system_metrics_interval_s"):
        load_config(None, ["tracking.system_metrics_interval_s=0"])
    with pytest.raises(ConfigError, match="system_metrics"):
        load_config(None, ["tracking.system_metric=false"])


def test_datasets_are_logged_as_run_inputs(store, synthetic_source, tmp_path):
    from core.data.cache import prepare
    from core.data.dataset import CachedCTDataset
    from tests.data_fixtures import data_config

    cfg = data_config(synthetic_source, tmp_path / "cache")
    prepare(cfg, splits=("train", "valid"), progress=False)
    splits = {"train": CachedCTDataset(cfg, "train"), "valid": CachedCTDataset(cfg, "valid")}
    tracker = Tracker(store, "exp")
    tracker.log_datasets(splits, cfg.root, "synthetic")
    inputs = MlflowClient(store).get_run(tracker.run_id).inputs.dataset_inputs
    logged = {i.tags[0].value: i.dataset for i in inputs}
    assert set(logged) == {"train", "valid"}
    for split, dataset in splits.items():
        assert logged[split].name == f"synthetic/{split}"
        assert logged[split].digest == dataset.fingerprint
        assert json.loads(logged[split].profile) == {"split": split, "num_volumes": len(dataset)}
        assert json.loads(logged[split].source) == {"uri": str(synthetic_source.resolve())}
    assert json.loads(logged["train"].profile)["num_volumes"] == 10
