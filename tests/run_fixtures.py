"""The tiny CT-ViT training run the matrix, SLURM and distributed tests share: seconds a cell on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_run(data_dir: Path, out: Path, steps: int, checkpoint_every: int = 0, **train: Any) -> dict:
    """A config dict training the tiny CT-ViT for ``steps`` steps on ``data_dir``'s synthetic root and cache."""
    return {
        "model": {"encoder": "ctvit", "preset": "tiny", "text_encoder": "tiny-random", "latent_dim": 32,
                  "encoder_args": {"dim": 32, "patch": 8, "temporal_patch": 4, "heads": 2, "dim_head": 16}},
        "data": {"root": str(data_dir / "root"), "cache_dir": str(data_dir / "cache"), "target_shape": [16, 32, 32],
                 "target_spacing": [15.0, 9.0, 9.0], "num_workers": 0},
        "train": {"max_steps": steps, "epochs": 100, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1,
                  "output_dir": str(out), "checkpoint_every": checkpoint_every, **train},
        "eval": {"bootstrap": 0, "batch_size": 8, "every_epoch": False},
    }
