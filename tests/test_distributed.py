"""Two gloo processes on CPU compute the same contrastive loss and gradients as one process on the global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from core.config import load_config
from core.model import build_model
from tests.conftest import TINY_OVERRIDES

GLOBAL_BATCH = 4
TEXTS = ["Cardiomegaly is present.", "No pleural effusion.", "A nodule in the right upper lobe.",
         "Emphysema and atelectasis."]


def _model_and_batch(loss: str):
    torch.manual_seed(0)
    model = build_model(load_config(None, [*TINY_OVERRIDES, f"model.loss={loss}"]))
    volumes = torch.rand(GLOBAL_BATCH, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, volumes, model.tokenize(TEXTS)


def _worker(rank: int, port: int, loss: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, volumes, tokens = _model_and_batch(loss)
    ddp = DistributedDataParallel(model)
    shard = slice(rank * 2, rank * 2 + 2)
    value = ddp(volumes[shard], tokens["input_ids"][shard], tokens["attention_mask"][shard])["loss"]
    value.backward()
    if rank == 0:
        out["loss"] = value.item()
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_process_ddp_matches_one_process(loss):
    model, volumes, tokens = _model_and_batch(loss)
    single = model(volumes, **tokens)["loss"]
    single.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), loss, out), nprocs=2, join=True)
        result = dict(out)
    assert result["loss"] == pytest.approx(single.item(), rel=1e-5)
    assert result["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
