"""`ctlab tune`: TPE trials as MLflow child runs, pruning fed by per-epoch AUROC, best config written out."""

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from core.cli import main
from core.config import load_config
from core.registry import ConfigError
from experiments.tune import load_tune

pytestmark = pytest.mark.slow


def _tune_file(tmp_path, synthetic_root, **extra):
    data = {
        "name": "t", "n_trials": 4, "metric": "zeroshot_auroc",
        # keep only a trial at least as good as the best before it at the same epoch: the rest are pruned
        "pruner": {"type": "percentile", "percentile": 1.0, "n_startup_trials": 1, "n_warmup_steps": 0},
        "base": {
            "model": {"preset": "tiny", "text_encoder": "tiny-random", "latent_dim": 32,
                      "encoder_args": {"dim": 32, "patch": 8, "temporal_patch": 4, "heads": 2, "dim_head": 16}},
            "data": {"root": str(synthetic_root), "cache_dir": str(tmp_path / "cache"),
                     "target_shape": [16, 32, 32], "target_spacing": [15.0, 9.0, 9.0]},
            "train": {"epochs": 2, "batch_size": 4, "output_dir": str(tmp_path / "runs")},
            "eval": {"bootstrap": 0},
        },
        "space": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                  "train.warmup_steps": {"type": "int", "low": 0, "high": 3}},
        **extra,
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tune_runs_trials_and_writes_the_best_config(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "root"), "--train", "8", "--valid", "6"]) == 0
    path = _tune_file(tmp_path, tmp_path / "root")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "best.yaml"
    assert main(["tune", str(path), "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path}/optuna.db",
                 "--out", str(out), "--no-progress"]) == 0
    best = load_config(out)
    assert 1e-5 <= best.train.lr <= 1e-3 and 0 <= best.train.warmup_steps <= 3
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("ctlab.kind") == "tune"]
    trials = [r for r in runs if r.data.tags.get("tune") == "t" and r.data.tags.get("ctlab.kind") == "train"]
    assert len(parents) == 1 and len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    study = optuna.load_study(study_name="tune/t", storage=f"sqlite:///{tmp_path}/optuna.db")
    pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    complete = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert pruned and complete and pruned | complete == {0, 1, 2, 3}, f"pruned {pruned}, complete {complete}"
    for run in trials:
        epochs = client.get_metric_history(run.info.run_id, "zeroshot_auroc")
        if int(run.data.tags["trial"]) in pruned:  # stopped after its first evaluation, with the reason
            assert run.info.status == "KILLED" and "pruned at epoch 1" in run.data.tags["stop_reason"]
            assert [m.step for m in epochs] == [1]
        else:
            assert run.info.status == "FINISHED" and [m.step for m in epochs] == [1, 2]
    assert len({r.data.params["train.lr"] for r in trials}) == 4  # every trial tried its own learning rate
    assert any(float(r.data.params["train.lr"]) == pytest.approx(best.train.lr) for r in trials)


def test_tune_file_with_a_bad_key_is_explained(tmp_path):
    path = _tune_file(tmp_path, tmp_path, space={"train.lrr": {"type": "float", "low": 0.1, "high": 1.0}})
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_tune(path)
    path = _tune_file(tmp_path, tmp_path, n_trails=3)
    with pytest.raises(ConfigError, match="did you mean 'n_trials'"):
        load_tune(path)
