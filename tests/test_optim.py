import math

import pytest
import torch

from core.config import TrainConfig
from core.optim import WarmupCosine, create_optimizer, create_scheduler


def test_warmup_then_cosine_to_min_ratio():
    schedule = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(10, 110))


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, schedule="cosine")
    opt = create_optimizer(model, cfg, torch.device("cpu"))
    sched = create_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] < 1e-4


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    model.loss = torch.nn.Module()
    model.loss.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    opt = create_optimizer(model, TrainConfig(weight_decay=0.05), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_text_tower_runs_at_its_own_scaled_lr_through_the_schedule():
    model = torch.nn.ModuleDict({"image_encoder": torch.nn.Linear(4, 4), "text_encoder": torch.nn.Linear(4, 4)})
    cfg = TrainConfig(lr=1e-3, text_lr_scale=0.1, warmup_steps=2, weight_decay=0.05)
    opt = create_optimizer(model, cfg, torch.device("cpu"))
    sched = create_scheduler(opt, cfg, total_steps=10)
    owner = {id(p): name.split(".")[0] for name, p in model.named_parameters()}
    for _ in range(5):
        opt.step()
        sched.step()
    for group in opt.param_groups:
        towers = {owner[id(p)] for p in group["params"]}
        assert len(towers) == 1  # a group never mixes the towers
        scale = 0.1 if towers == {"text_encoder"} else 1.0
        assert group["lr"] == pytest.approx(1e-3 * scale * WarmupCosine(2, 10)(5))
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim == 2 else 0.0)


def test_default_text_lr_keeps_two_groups_so_older_checkpoints_resume():
    model = torch.nn.ModuleDict({"image_encoder": torch.nn.Linear(4, 4), "text_encoder": torch.nn.Linear(4, 4)})
    opt = create_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
