import random

import numpy as np
import pytest
import torch

from core.checkpoint import TrainPosition, load_checkpoint, save_checkpoint, set_rng_state
from core.config import TrainConfig
from core.optim import create_optimizer, create_scheduler
from core.registry import ConfigError


def _parts():
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, TrainConfig(lr=0.1, warmup_steps=2), torch.device("cpu"))
    sched = create_scheduler(opt, TrainConfig(lr=0.1, warmup_steps=2), 10)
    return model, opt, sched, torch.amp.GradScaler("cpu", enabled=False)


def test_checkpoint_restores_state_and_random_streams(tmp_path):
    model, opt, sched, scaler = _parts()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "last.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                           position=TrainPosition(step=7, epoch=1, batch_in_epoch=3), run_id="abc")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = load_checkpoint(path)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    fresh, fresh_opt, fresh_sched, _ = _parts()
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    torch.testing.assert_close(fresh.weight, model.weight)
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    assert state["position"] == {"step": 7, "epoch": 1, "batch_in_epoch": 3} and state["run_id"] == "abc"


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    model, opt, sched, scaler = _parts()
    path = save_checkpoint(tmp_path / "last.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                           position=TrainPosition(), run_id=None)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"cannot be read.*delete it"):
        load_checkpoint(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
