"""Two gloo processes on CPU compute the same contrastive loss and gradients as one process on the global batch,
in the model and through the real training loop under torchrun (with a kill and a resume)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from mlflow import MlflowClient
from torch.nn.parallel import DistributedDataParallel

from core.checkpoint import load_checkpoint
from core.cli import main
from core.config import load_config
from core.losses import gather_features
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


def _gather_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather_features(local)
    (gathered * torch.arange(12.0).view(4, 3)).sum().backward()
    out[rank] = (gathered.detach().clone(), local.grad.clone())
    dist.destroy_process_group()


def test_gather_concatenates_every_rank_in_order_with_gradients():
    """gather_features on 2 gloo ranks: (4, 3) = rank 0's rows then rank 1's, on both ranks; each rank's
    gradient is the sum over ranks of the upstream gradient at its own rows."""
    alone = torch.ones(2, 3)
    assert gather_features(alone) is alone  # no process group: the features themselves
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_worker, args=(_free_port(), out), nprocs=2, join=True)
        result = dict(out)
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    upstream = torch.arange(12.0).view(4, 3)
    for rank in (0, 1):
        gathered, grad = result[rank]
        torch.testing.assert_close(gathered, expected)
        torch.testing.assert_close(grad, 2 * upstream[2 * rank:2 * rank + 2])  # both ranks' losses reach it


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


# --------------------------------------------------------------------------- the real training loop under torchrun

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _train_config(tmp_path: Path, data: Path, name: str, batch_size: int) -> Path:
    """A tiny CT-ViT run of STEPS steps (3 per epoch on 12 volumes), checkpointing every 2 steps."""
    cfg = {
        "model": {"encoder": "ctvit", "preset": "tiny", "text_encoder": "tiny-random", "latent_dim": 32,
                  "encoder_args": {"dim": 32, "patch": 8, "temporal_patch": 4, "heads": 2, "dim_head": 16}},
        "data": {"root": str(data / "root"), "cache_dir": str(data / "cache"), "target_shape": [16, 32, 32],
                 "target_spacing": [15.0, 9.0, 9.0], "num_workers": 0},
        "train": {"max_steps": STEPS, "epochs": 100, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 1,
                  "output_dir": str(tmp_path / name), "checkpoint_every": 2, "device": "cpu"},
        "eval": {"bootstrap": 0, "batch_size": 8, "every_epoch": False},
        "tracking": {"uri": f"sqlite:///{tmp_path}/{name}.db"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "core.cli", "train", str(config), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [p for child in children for p in (child, *_descendants(child))]


def _kill_job(proc: subprocess.Popen) -> None:
    """kill -9 the torchrun agent and every rank at once, as when the machine dies."""
    ranks = _descendants(proc.pid)
    for pid in [*ranks, proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)


def _run(tmp_path: Path, name: str):
    [run] = MlflowClient(f"sqlite:///{tmp_path}/{name}.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/{name}.db").search_experiments()])
    return run


@pytest.mark.slow
def test_torchrun_training_equals_one_process_and_resumes(tmp_path):
    """2 gloo ranks × batch 2 = 1 process × batch 4, step for step, through ``ctlab train``; a run killed
    under torchrun and resumed with ``--resume`` continues the same run from the step after its checkpoint."""
    assert main(["data", "synth", "--out", str(tmp_path / "root"), "--train", "12", "--valid", "8",
                 "--seed", "3", "--no-progress"]) == 0
    single = _train_config(tmp_path, tmp_path, "single", batch_size=4)
    assert main(["train", str(single)]) == 0
    reference = {m.step: m.value for m in MlflowClient(f"sqlite:///{tmp_path}/single.db").get_metric_history(
        _run(tmp_path, "single").info.run_id, "train_loss")}
    assert sorted(reference) == list(range(1, STEPS + 1))

    ddp = _train_config(tmp_path, tmp_path, "ddp", batch_size=2)
    proc = subprocess.Popen(_torchrun(ddp), cwd=tmp_path, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = None
    deadline = time.time() + 300
    while ckpt is None and proc.poll() is None and time.time() < deadline:
        found = list((tmp_path / "ddp").glob("*/checkpoints/last.pt"))
        ckpt = found[0] if found else None
        time.sleep(0.02)
    assert proc.poll() is None, f"torchrun ended before its first checkpoint: {proc.stderr.read().decode()[-3000:]}"
    _kill_job(proc)
    saved = load_checkpoint(ckpt)
    killed_step, killed_run = saved["position"]["step"], saved["run_id"]
    assert 0 < killed_step < STEPS

    resume_ms = int(time.time() * 1000)
    rerun = subprocess.run(_torchrun(ddp, "--resume"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = _run(tmp_path, "ddp")
    assert run.info.run_id == killed_run and run.info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/ddp.db").get_metric_history(run.info.run_id, "train_loss")
    resumed = {m.step: m.value for m in history if m.timestamp >= resume_ms}
    before = {m.step: m.value for m in history if m.timestamp < resume_ms and m.step <= killed_step}
    assert sorted(resumed) == list(range(killed_step + 1, STEPS + 1))
    assert sorted(before) == list(range(1, killed_step + 1))
    losses = {**before, **resumed}
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=1e-5), f"step {step}: 2 ranks {losses[step]}, 1 process {value}"
    probe = MlflowClient(f"sqlite:///{tmp_path}/ddp.db").get_metric_history(run.info.run_id, "probe_auroc")
    assert len(probe) == 1  # the linear probe: rank 0, once, at the end of the resumed run
    single_probe = _run(tmp_path, "single").data.metrics["probe_auroc"]
    assert probe[0].value == pytest.approx(single_probe, abs=0.02)  # the same model, up to float noise
