"""The scientific bar: on synthetic CT-RATE the untrained model is at chance and a short CPU run beats it clearly."""

from pathlib import Path

import pytest

from core.cli import main
from core.config import load_config
from core.train import train

pytestmark = pytest.mark.slow
PRESET = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "synthetic-tiny.yaml"


def test_short_run_beats_chance_clearly(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "root"), "--train", "400", "--valid", "100",
                 "--no-progress"]) == 0
    overrides = [f"data.root={tmp_path / 'root'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"train.output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                 "eval.bootstrap=1000"]
    untrained = train(load_config(PRESET, [*overrides, "train.lr=1e-12", "train.max_steps=1"]), progress=False)
    assert 0.4 < untrained.metrics["zeroshot_auroc"] < 0.6
    result = train(load_config(PRESET, [*overrides, "train.epochs=3"]), progress=False)
    auroc = result.metrics["zeroshot_auroc"]
    assert result.metrics["zeroshot_auroc_ci_low"] > 0.5  # the 95 % bootstrap interval excludes chance
    assert auroc > untrained.metrics["zeroshot_auroc"] + 0.05
