"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds model, optimizer, scheduler and scaler state, the RNG
states (python, numpy, torch, CUDA), the position in training (step, epoch,
batches consumed in that epoch) and the MLflow run id, written atomically
(temp file + rename) so a kill never leaves a half-written file. Loading uses
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.registry import ConfigError


@dataclass
class TrainPosition:
    """Where training stands: optimizer steps done, current epoch, batches of it consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by ``rng_state``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, position: TrainPosition,
                    run_id: str | None) -> Path:
    """Write a resumable checkpoint to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "position": asdict(position),
        "run_id": run_id,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, label: str | None = None,
                    missing: str = "does not exist; start without --resume",
                    damaged_fix: str = "delete it to start the run afresh") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; a missing or damaged file gives a clear error that
    names it as ``label`` (default ``checkpoint '<path>'``) and what to do in the caller's case."""
    path = Path(path)
    label = label or f"checkpoint '{path}'"
    if not path.is_file():
        raise ConfigError(f"{label} {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ConfigError(f"{label} cannot be read ({type(err).__name__}: {err}); {damaged_fix}") from None


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Start ``model`` from the weights of a checkpoint (``train.init_from``: a run's or a converted one).

    Strict: a tensor the checkpoint lacks or has in another shape is an error naming it (the config must
    describe the same architecture, e.g. the config ``ctlab convert`` wrote). A missing or unreadable file, or
    one without this suite's ``model`` entry (a CT-CLIP or DCFormer state_dict given as is), is an error naming
    ``train.init_from`` and the converter.
    """
    hint = "give the model.pt that a run or `ctlab convert ctclip|dcformer` wrote"
    payload = load_checkpoint(path, f"train.init_from={path}:", f"no such file; {hint}", hint)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise ConfigError(f"train.init_from={path}: not a checkpoint of this suite (no 'model' state_dict in it; "
                          f"another codebase's state_dict is converted first); {hint}")
    weights = payload["model"]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from={path}: the checkpoint does not fit this config's model "
                          f"({str(err).splitlines()[0]} …: {'; '.join(str(err).splitlines()[1:3])}); "
                          "use the config the checkpoint was written with") from None
