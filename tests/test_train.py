"""One training run end to end on synthetic CT-RATE: MLflow contents, resume, NaN handling."""

import math
import os
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from core.cli import main
from core.config import load_config, save_config
from core.data import PATHOLOGIES
from core.interrupts import STEP_BOUNDARY, StepBoundary
from core.tracking import Tracker
from core.train import NonFiniteLossError, run_dir_for, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    assert main(["data", "synth", "--out", str(folder / "root"), "--train", "12", "--valid", "8", "--seed", "1"]) == 0
    return folder


def _config(synthetic: Path, tmp_path: Path, *extra: str):
    return load_config(None, [
        "model.preset=tiny", "model.text_encoder=tiny-random", "model.latent_dim=32",
        "model.encoder_args={dim: 32, patch: 8, temporal_patch: 4, heads: 2, dim_head: 16}",
        f"data.root={synthetic / 'root'}", f"data.cache_dir={synthetic / 'cache'}", "data.target_shape=[16, 32, 32]",
        "data.target_spacing=[15.0, 9.0, 9.0]", "train.batch_size=4", "train.lr=1e-4", "train.warmup_steps=2",
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "eval.bootstrap=50", "eval.batch_size=8", *extra,
    ])


def test_run_logs_params_metrics_and_artifacts(synthetic, tmp_path):
    cfg = _config(synthetic, tmp_path, "train.epochs=2", "model.loss=siglip")
    result = train(cfg, progress=False)
    assert result.step == 2 * (12 // 4)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.loss"] == "siglip" and run.data.params["train.epochs"] == "2"
    assert {"git_commit", "torch_version", "cuda_version", "device", "data_fingerprint"} <= set(run.data.tags)
    for name in ("train_loss", "lr", "logit_scale", "logit_bias", "samples_per_s", "peak_memory_mb", "data_wait_ms"):
        assert len(client.get_metric_history(result.run_id, name)) == result.step, name
    auroc = client.get_metric_history(result.run_id, "zeroshot_auroc")
    assert [m.step for m in auroc] == [1, 2] and 0.0 <= auroc[-1].value <= 1.0
    for name in ("zeroshot_auprc", "zeroshot_f1", "zeroshot_precision", "zeroshot_recall", "zeroshot_accuracy",
                 "zeroshot_f1_fixed0.5", "zeroshot_auroc_ci_low", "zeroshot_auroc_ci_high", "retrieval_v2t_r1"):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "zeroshot_per_label.csv", "zeroshot_predictions.csv", "roc.png", "checkpoints"} <= artifacts
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    predictions = pd.read_csv(download_artifacts(run_id=result.run_id, artifact_path="zeroshot_predictions.csv",
                                                 tracking_uri=cfg.tracking.uri))
    assert list(predictions.columns) == ["VolumeName", "pathology", "score", "label"]
    assert len(predictions) == 8 * len(PATHOLOGIES)

    # the linear-probe readout: logged once, at the last epoch, with the zero-shot metric names and files
    probe_auroc = client.get_metric_history(result.run_id, "probe_auroc")
    assert [m.step for m in probe_auroc] == [2] and 0.0 <= probe_auroc[0].value <= 1.0
    for name in ("probe_auprc", "probe_f1", "probe_precision", "probe_recall", "probe_accuracy", "probe_f1_fixed0.5",
                 "probe_auroc_ci_low", "probe_auroc_ci_high", "probe_f1_ci_low", "wall_probe_s"):
        assert name in run.data.metrics, name
    assert run.data.metrics["probe_auroc_ci_low"] <= run.data.metrics["probe_auroc"] <= run.data.metrics[
        "probe_auroc_ci_high"]
    assert result.metrics["probe_auroc"] == pytest.approx(probe_auroc[0].value)
    assert {"probe_per_label.csv", "probe_predictions.csv"} <= artifacts
    probe = pd.read_csv(download_artifacts(run_id=result.run_id, artifact_path="probe_predictions.csv",
                                           tracking_uri=cfg.tracking.uri))
    assert list(probe.columns) == ["VolumeName", "pathology", "score", "label"]
    assert len(probe) == 8 * len(PATHOLOGIES) and probe.score.between(0, 1).all()
    keys = ["VolumeName", "pathology", "label"]
    assert probe[keys].equals(predictions[keys])  # the same validation volumes and labels as zero-shot
    per_label = pd.read_csv(download_artifacts(run_id=result.run_id, artifact_path="probe_per_label.csv",
                                               tracking_uri=cfg.tracking.uri))
    assert list(per_label.columns) == ["pathology", "auroc", "auprc", "f1", "precision", "recall", "accuracy",
                                       "threshold", "protocol"]
    assert len(per_label) == 2 * len(PATHOLOGIES)  # ctclip and fixed0.5


def test_disabled_probe_logs_no_probe_readout(synthetic, tmp_path):
    cfg = _config(synthetic, tmp_path, "train.max_steps=1", "eval.probe.enabled=false", "eval.bootstrap=0")
    result = train(cfg, progress=False)
    client = MlflowClient(cfg.tracking.uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert "zeroshot_auroc" in metrics
    assert not [name for name in metrics if "probe" in name]
    assert not [a.path for a in client.list_artifacts(result.run_id) if a.path.startswith("probe")]


def test_resume_after_interrupt_reproduces_the_uninterrupted_run(synthetic, tmp_path):
    full = train(_config(synthetic, tmp_path / "a", "train.epochs=3"), progress=False)

    cfg = _config(synthetic, tmp_path / "b", "train.epochs=3", "train.checkpoint_every=1")
    original = Tracker.log_metrics

    def interrupt_at_step_4(self, metrics, step):
        original(self, metrics, step)
        if "train_loss" in metrics and step == 4:
            raise KeyboardInterrupt

    Tracker.log_metrics = interrupt_at_step_4
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        Tracker.log_metrics = original
    client = MlflowClient(cfg.tracking.uri)
    [killed] = client.search_runs([client.get_experiment_by_name("ctlab").experiment_id])
    assert killed.info.status == "KILLED"

    resumed = train(cfg, resume=True, progress=False)
    assert resumed.run_id == killed.info.run_id  # the same MLflow run continues
    assert resumed.step == full.step == 9
    assert len(resumed.losses) == 5  # steps 5..9, mid-epoch 2
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5, abs=1e-6)
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5, abs=1e-6)
    assert resumed.metrics["zeroshot_auroc"] == pytest.approx(full.metrics["zeroshot_auroc"], abs=1e-6)
    probe = MlflowClient(cfg.tracking.uri).get_metric_history(resumed.run_id, "probe_auroc")
    assert [m.step for m in probe] == [3]  # once, at the end of the resumed run
    assert probe[0].value == pytest.approx(full.metrics["probe_auroc"], abs=1e-6)


def test_stop_signal_mid_step_waits_for_the_step_so_the_resumed_history_has_no_hole(synthetic, tmp_path):
    """A scheduler's signal arriving while step 3's metrics are on their way to MLflow stops after step 3."""
    cfg = _config(synthetic, tmp_path, "train.max_steps=6", "train.epochs=10", "train.checkpoint_every=100")
    original = Tracker.log_metrics

    def signal_while_logging_step_3(self, metrics, step):
        if "train_loss" in metrics and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs here, before step 3 is logged
        original(self, metrics, step)

    previous = signal.signal(signal.SIGUSR1, lambda *_: STEP_BOUNDARY.interrupt(KeyboardInterrupt("time limit")))
    Tracker.log_metrics = signal_while_logging_step_3
    try:
        with pytest.raises(KeyboardInterrupt, match="time limit"):
            train(cfg, progress=False)
    finally:
        Tracker.log_metrics = original
        signal.signal(signal.SIGUSR1, previous)
    assert not STEP_BOUNDARY.pending
    resumed = train(cfg, resume=True, progress=False)
    assert len(resumed.losses) == 3  # steps 4..6: step 3 completed before the stop and is not repeated
    history = MlflowClient(cfg.tracking.uri).get_metric_history(resumed.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]


def test_step_boundary_raises_at_once_outside_a_step_and_after_it_inside():
    boundary = StepBoundary()
    with pytest.raises(KeyboardInterrupt, match="now"):
        boundary.interrupt(KeyboardInterrupt("now"))
    done = []
    with pytest.raises(KeyboardInterrupt, match="first"), boundary.hold():
        boundary.interrupt(KeyboardInterrupt("first"))
        boundary.interrupt(KeyboardInterrupt("second"))
        done.append("rest of the step")
        boundary.at_boundary()
        done.append("next step")
    assert done == ["rest of the step"] and not boundary.pending
    with pytest.raises(KeyboardInterrupt, match="at exit"), boundary.hold():  # the loop ended before a boundary
        boundary.interrupt(KeyboardInterrupt("at exit"))
    with pytest.raises(KeyboardInterrupt, match="free again"):
        boundary.interrupt(KeyboardInterrupt("free again"))


def test_nan_loss_fails_the_run_with_its_reason(synthetic, tmp_path):
    cfg = _config(synthetic, tmp_path, "model.logit_scale_init=.nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train(cfg, progress=False)
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name("ctlab").experiment_id])
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError: loss is nan" in run.data.tags["failure_reason"]


def test_resume_without_checkpoint_starts_fresh(synthetic, tmp_path):
    cfg = _config(synthetic, tmp_path, "train.max_steps=1")
    assert not (run_dir_for(cfg) / "checkpoints" / "last.pt").exists()
    result = train(cfg, resume=True, progress=False)
    assert result.step == 1 and math.isfinite(result.final_loss)
    assert (run_dir_for(cfg) / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("adaptation", ["full", "frozen_text"])
def test_eval_command_reproduces_the_runs_final_metrics(synthetic, tmp_path, capsys, adaptation):
    """Also for a frozen text tower, whose run reads cached report features and eval the live tower."""
    cfg = _config(synthetic, tmp_path, "train.max_steps=2", f"model.adaptation={adaptation}")
    result = train(cfg, progress=False)
    if adaptation == "frozen_text":
        assert list((Path(cfg.data.cache_dir) / "text-features").glob("*.pt"))
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert main(["eval", str(path), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  "))
    assert float(printed["zeroshot_auroc"]) == pytest.approx(result.metrics["zeroshot_auroc"], abs=1e-4)
    assert (tmp_path / "eval" / "zeroshot_per_label.csv").is_file()
    assert float(printed["probe_auroc"]) == pytest.approx(result.metrics["probe_auroc"], abs=1e-4)
    assert (tmp_path / "eval" / "probe_predictions.csv").is_file()
