"""The training loop: one resolved config in, one MLflow run out.

Read top to bottom: set up (ranks, seed, data, model, optimizer, schedule),
maybe resume from the last checkpoint, then for each epoch: batches →
forward → loss → backward → clip → step → log, checkpointing every N steps;
zero-shot evaluation after each epoch and at the end, then once the linear-probe
readout (core/probe.py) on frozen image embeddings. A non-finite loss stops
the run with status FAILED and the reason; Ctrl-C leaves it KILLED and
resumable. Under torchrun every rank trains, rank 0 alone logs and saves.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core.checkpoint import TrainPosition, load_checkpoint, load_model_weights, save_checkpoint, set_rng_state
from core.config import Config, DataConfig, config_id
from core.distributed import DistEnv, barrier, init_distributed, shutdown
from core.interrupts import STEP_BOUNDARY
from core.model import CLIPModel, build_model
from core.optim import create_optimizer, create_scheduler
from core.text_cache import FeatureCollate, features_path, report_features
from core.tracking import Tracker, environment_tags

log = logging.getLogger(__name__)
PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run cannot continue meaningfully."""


class StopTraining(Exception):
    """Raised by an epoch callback to end a run early on purpose (e.g. a pruned tuning trial)."""


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_id: str | None
    run_dir: Path
    step: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def run_dir_for(cfg: Config) -> Path:
    """The folder holding a config's checkpoints: ``train.output_dir / config_id``."""
    return Path(cfg.train.output_dir) / config_id(cfg)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a CPU run is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can start mid-epoch."""

    def __init__(self, dataset: Any, env: DistEnv, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip_samples: int = 0) -> None:
        """Serve epoch ``epoch``'s order, leaving out its first ``skip_samples`` samples (already trained on)."""
        self.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


class TokenizingCollate:
    """Stack a list of dataset items and tokenise their reports once, in the loader worker."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from core.data.dataset import collate

        batch = collate(items)
        tokens = self.tokenize(batch["text"])
        batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return batch


def frozen_text_collate(model: CLIPModel, cfg: Config, datasets: list[Any], env: DistEnv,
                        progress: bool) -> FeatureCollate:
    """Stack items and add each report's cached frozen-tower features (computed once, by rank 0); no tokens."""
    from core.data.dataset import collate

    texts = sorted({text for dataset in datasets for text in dataset.texts})
    path = features_path(cfg, texts)
    features = report_features(model.text_encoder, texts, path, cfg.eval.batch_size, progress) if env.is_main else None
    barrier(env)
    if features is None:  # other ranks read what rank 0 wrote
        features = report_features(model.text_encoder, texts, path)
    return FeatureCollate(collate, texts, features)


def make_loader(dataset: Any, cfg: DataConfig, batch_size: int, collate_fn: Any, sampler: Any = None,
                device: torch.device | None = None) -> DataLoader:
    """A DataLoader with the config's worker, pinning and prefetch settings."""
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate_fn,
        num_workers=workers, pin_memory=cfg.pin_memory and device is not None and device.type == "cuda",
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on GPU; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def autocast_for(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of ``train.precision`` on ``device`` (disabled for fp32)."""
    dtype = PRECISION[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def evaluate_epoch(model: CLIPModel, loader: DataLoader, cfg: Config, device: torch.device) -> Any:
    """Zero-shot evaluation on the validation split (rank 0), under the run's autocast precision."""
    from core.evaluate import evaluate_zero_shot

    with autocast_for(cfg.train.precision, device):
        return evaluate_zero_shot(model, loader, cfg.eval, device)


def probe_readout_final(model: CLIPModel, train_set: Any, valid: Any, cfg: Config, device: torch.device,
                        progress: bool = False) -> Any:
    """The linear-probe readout (rank 0, once at the end): the train split embedded in order with the eval
    batch size and the run's autocast precision, the probe fitted in fp32 and scored on ``valid``'s embeddings."""
    from core.data.dataset import collate
    from core.probe import probe_readout

    loader = make_loader(train_set, cfg.data, cfg.eval.batch_size, collate, None, device)
    with autocast_for(cfg.train.precision, device):
        return probe_readout(model, loader, valid, cfg.eval, device, seed=cfg.train.seed, progress=progress)


def train(cfg: Config, resume: bool = False, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None, progress: bool = True,
          epoch_callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train one configuration end to end and log it to MLflow; see the module docstring.

    ``epoch_callback(epoch, metrics)`` runs on rank 0 after each epoch's evaluation; it may raise
    ``StopTraining`` to end the run early (status KILLED, reason tagged).
    """
    from core.data.cache import data_fingerprint, prepare
    from core.data.dataset import CachedCTDataset
    from core.lora import apply_adaptation

    env = init_distributed(cfg.train.device)
    device, t = env.device, cfg.train
    seed_everything(t.seed)
    run_dir = run_dir_for(cfg)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None

    # ---- data: prepared once into the cache (rank 0), then read from it by every rank
    if env.is_main:
        summary = prepare(cfg.data, splits=("train", cfg.eval.split), progress=progress)
    barrier(env)
    train_set, valid_set = CachedCTDataset(cfg.data, "train"), CachedCTDataset(cfg.data, cfg.eval.split)

    # ---- model, adaptation, optimizer, schedule
    model = build_model(cfg)
    if t.init_from and state is None:  # pretrained weights (e.g. converted CT-CLIP); a resumed run has its own
        load_model_weights(model, t.init_from)
    adaptation = apply_adaptation(model, cfg.model)
    model.to(device)
    if t.compile:
        model.image_encoder = torch.compile(model.image_encoder, mode=t.compile_mode)
    sampler = ResumableSampler(train_set, env, seed=t.seed)
    if cfg.model.adaptation == "frozen_text":  # the tower cannot change: embed each report once, not every step
        collate_fn = frozen_text_collate(model, cfg, [train_set, valid_set], env, progress)
    else:
        collate_fn = TokenizingCollate(model.text_encoder.report_tokenizer)
    train_loader = make_loader(train_set, cfg.data, t.batch_size, collate_fn, sampler, device)
    valid_loader = make_loader(valid_set, cfg.data, cfg.eval.batch_size, collate_fn, None, device)
    steps_per_epoch = len(sampler) // t.batch_size // t.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"train split has {len(train_set)} volumes: too few for train.batch_size={t.batch_size} "
                         f"× train.grad_accum={t.grad_accum} on {env.world_size} process(es)")
    batches_per_epoch = steps_per_epoch * t.grad_accum  # a trailing partial accumulation is dropped
    total_steps = min(t.max_steps or math.inf, steps_per_epoch * t.epochs)
    optimizer = create_optimizer(model, t, device)
    scheduler = create_scheduler(optimizer, t, int(total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    position = TrainPosition()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        position = TrainPosition(**state["position"])
        set_rng_state(state["rng"])
        log.info("resuming %s from step %d (epoch %d, batch %d)", run_dir, position.step, position.epoch,
                 position.batch_in_epoch)
    ddp = DistributedDataParallel(model) if env.distributed else model

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.name,
                      run_id=state["run_id"] if state else None, parent_run_id=parent_run_id,
                      tags={"ctlab.kind": "train", "config_id": config_id(cfg), **cfg.tracking.tags, **(tags or {})},
                      enabled=env.is_main,
                      system_metrics_s=cfg.tracking.system_metrics_interval_s if cfg.tracking.system_metrics else None)
    losses: list[float] = []
    metrics: dict[str, float] = {}
    try:
        tracker.log_config(cfg)
        tracker.log_datasets({"train": train_set, cfg.eval.split: valid_set}, cfg.data.root,
                             Path(cfg.data.root).resolve().name)
        tracker.set_tags({**environment_tags(device), "data_fingerprint": data_fingerprint(cfg.data, "train"),
                          "run_dir": str(run_dir.resolve())})
        if env.is_main:
            tracker.set_tags({"skipped_inputs": summary.skipped_count})
            tracker.log_metrics({"skipped_inputs": summary.skipped_count,
                                 **{f"adaptation_{k}": v for k, v in adaptation.items()}}, step=0)

        def checkpoint() -> None:
            if env.is_main:
                save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                position=position, run_id=tracker.run_id)

        autocast = PRECISION[t.precision]
        bar = tqdm(total=int(total_steps), initial=position.step, desc=cfg.name, disable=not (progress and env.is_main),
                   dynamic_ncols=True)
        while position.step < total_steps and position.epoch < t.epochs:
            model.train()
            sampler.set_position(position.epoch, position.batch_in_epoch * t.batch_size)
            micro, step_start, data_wait = 0, time.perf_counter(), 0.0
            fetch_start = time.perf_counter()
            with STEP_BOUNDARY.hold():  # a stop signal waits for the step's end; see core/interrupts.py
                for batch in itertools.islice(train_loader, batches_per_epoch - position.batch_in_epoch):
                    data_wait += time.perf_counter() - fetch_start
                    micro += 1
                    sync = micro % t.grad_accum == 0
                    volumes = batch["volume"].to(device, non_blocking=True)
                    text_keys = ("text_features",) if "text_features" in batch else ("input_ids", "attention_mask")
                    text = {k: batch[k].to(device, non_blocking=True) for k in text_keys}
                    with ddp.no_sync() if env.distributed and not sync else contextlib.nullcontext():
                        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                            loss = ddp(volumes, **text)["loss"]
                        if not torch.isfinite(loss):
                            raise NonFiniteLossError(
                                f"loss is {loss.item()} at step {position.step} (epoch {position.epoch + 1}); "
                                "lower train.lr, set train.grad_clip, or use train.precision=fp32")
                        scaler.scale(loss / t.grad_accum).backward()
                    position.batch_in_epoch += 1
                    if not sync:
                        fetch_start = time.perf_counter()
                        continue
                    if t.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    position.step += 1
                    losses.append(loss.item())
                    elapsed = time.perf_counter() - step_start
                    samples_per_s = t.batch_size * t.grad_accum * env.world_size / elapsed
                    if position.step % t.log_every == 0 or position.step == total_steps:
                        tracker.log_metrics({
                            "train_loss": loss.item(), "lr": scheduler.get_last_lr()[0], "samples_per_s": samples_per_s,
                            "peak_memory_mb": peak_memory_mb(device), "data_wait_ms": 1000 * data_wait,
                            "step_ms": 1000 * elapsed, **model.loss.state_metrics(),
                        }, step=position.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    samples_s=f"{samples_per_s:.1f}")
                    if t.checkpoint_every and position.step % t.checkpoint_every == 0:
                        checkpoint()
                    STEP_BOUNDARY.at_boundary()
                    if position.step >= total_steps:
                        break
                    step_start = fetch_start = time.perf_counter()
                    data_wait = 0.0
            epoch_done = position.batch_in_epoch >= batches_per_epoch or position.step >= total_steps
            if epoch_done:
                if env.is_main and (cfg.eval.every_epoch or position.step >= total_steps):
                    result = evaluate_epoch(model, valid_loader, cfg, device)
                    metrics = result.metrics
                    tracker.log_metrics(metrics, step=position.epoch + 1)
                    if epoch_callback is not None:
                        epoch_callback(position.epoch + 1, metrics)
                position.epoch += 1
                position.batch_in_epoch = 0
            barrier(env)
        bar.close()
        checkpoint()
        if env.is_main:
            if not metrics:
                result = evaluate_epoch(model, valid_loader, cfg, device)
                metrics = result.metrics
            probe = None
            if cfg.eval.probe.enabled:
                probe = probe_readout_final(model, train_set, result, cfg, device, progress)
                tracker.log_metrics(probe.metrics, step=position.epoch)
                metrics = {**metrics, **probe.metrics}
            log_final_artifacts(tracker, result, ckpt_path, probe)
        tracker.finish()
    except StopTraining as stop:
        tracker.set_tags({"stop_reason": str(stop)})
        tracker.kill()
        raise
    except KeyboardInterrupt:
        checkpoint()
        tracker.kill()
        raise
    except Exception as err:
        tracker.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        shutdown(env)
    return TrainResult(tracker.run_id, run_dir, position.step, losses[-1] if losses else float("nan"), losses,
                       metrics)


def log_final_artifacts(tracker: Tracker, result: Any, ckpt_path: Path, probe: Any = None) -> None:
    """Per-label metrics, predictions (zero-shot, and the probe's when it ran), the ROC figure and the checkpoint."""
    from core.data import PATHOLOGIES
    from core.evaluate import plot_roc

    tracker.log_dataframe(result.per_label, "zeroshot_per_label.csv")
    tracker.log_dataframe(result.predictions, "zeroshot_predictions.csv")
    if probe is not None:
        tracker.log_dataframe(probe.per_label, "probe_per_label.csv")
        tracker.log_dataframe(probe.predictions, "probe_predictions.csv")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(plot_roc(result.labels, result.scores, PATHOLOGIES, Path(tmp) / "roc.png"))
    tracker.log_artifact(ckpt_path, "checkpoints")
