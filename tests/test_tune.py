"""`ctlab tune`: TPE trials as MLflow child runs, pruning fed by per-epoch AUROC, best config written out."""

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
        "name": "t", "n_trials": 3, "metric": "zeroshot_auroc",
        "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
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
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)  # KILLED = pruned
    assert len({r.data.params["train.lr"] for r in trials}) == 3  # every trial tried its own learning rate
    assert any(float(r.data.params["train.lr"]) == pytest.approx(best.train.lr) for r in trials)


def test_tune_file_with_a_bad_key_is_explained(tmp_path):
    path = _tune_file(tmp_path, tmp_path, space={"train.lrr": {"type": "float", "low": 0.1, "high": 1.0}})
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_tune(path)
    path = _tune_file(tmp_path, tmp_path, n_trails=3)
    with pytest.raises(ConfigError, match="did you mean 'n_trials'"):
        load_tune(path)
