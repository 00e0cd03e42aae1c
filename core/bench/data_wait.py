"""Does training wait on data? Real training steps fed by the real cached DataLoader, timed as the trainer does.

``data_wait(cfg, workers=(0, 2))`` prepares the cache if needed (a no-op when
it exists), then for each loader setting runs training steps of ``cfg``'s
model (the bench's step: forward, loss, backward, clipping, AdamW, in the
config's precision) on batches from ``core.train.make_loader`` with
``core.train.TokenizingCollate`` over ``CachedCTDataset(cfg.data, "train")``.
As in the trainer, a step's data wait is the time spent asking the loader
for its batch, and the step time runs from that request to the loss being
read back (which waits for the device). The loader is re-iterated at the end
of an epoch, so epoch starts — where non-persistent workers restart — are
inside the measurement. The first ``warmup`` steps (worker start-up, lazy
initialisation) are not counted.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from core.bench.model import BenchSubject
from core.bench.probes import bench_device
from core.config import Config
from core.registry import ConfigError


def _batches(loader: Any) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch, for as long as they are asked for."""
    while True:
        yield from loader


def data_wait(
    cfg: Config,
    workers: Sequence[int] = (0, 2),
    steps: int = 12,
    warmup: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Per loader setting (``data.num_workers`` = each of ``workers``; pinning, persistence and prefetch from
    ``cfg.data``): the fraction of step time spent waiting on data, with the median wait, step time and
    samples/s over ``steps`` steps after ``warmup``."""
    from core.data.cache import prepare
    from core.data.dataset import CachedCTDataset
    from core.train import TokenizingCollate, make_loader

    if steps < 1 or warmup < 0 or any(n < 0 for n in workers):
        raise ConfigError("data-wait bench: needs steps >= 1, warmup >= 0 and worker counts >= 0")
    device = bench_device(device)
    batch_size = cfg.train.batch_size
    prepare(cfg.data, splits=("train",), progress=progress)
    dataset = CachedCTDataset(cfg.data, "train")
    usable = len(dataset) // batch_size * batch_size
    if usable == 0:
        raise ConfigError(f"data-wait bench: the train split has {len(dataset)} volumes, fewer than one batch of "
                          f"train.batch_size={batch_size}; lower train.batch_size or synthesise more volumes")
    if tuple(dataset.shape) != tuple(cfg.data.target_shape):
        raise ConfigError(f"data-wait bench: the cache holds {list(dataset.shape)} volumes, the config asks for "
                          f"{cfg.data.target_shape}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.train.seed))[:usable].tolist()
    subject = BenchSubject(cfg, 1, device)
    collate = TokenizingCollate(subject.model.text_encoder.report_tokenizer)
    rows = []
    for count in workers:
        data_cfg = dataclasses.replace(cfg.data, num_workers=count)
        loader = make_loader(dataset, data_cfg, batch_size, collate, sampler=order, device=device)
        batches = _batches(loader)
        waits, totals = [], []
        fetch = time.perf_counter()
        for i in tqdm(range(warmup + steps), desc=f"{count} workers", unit="step", disable=not progress,
                      leave=False):
            batch = next(batches)
            got = time.perf_counter()
            volumes = batch["volume"].to(device, non_blocking=True)
            tokens = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask")}
            subject.train_step(volumes, tokens).item()  # reads the loss back, as the trainer's logging does
            done = time.perf_counter()
            if i >= warmup:
                waits.append(got - fetch)
                totals.append(done - fetch)
            fetch = done
        batches.close()
        del loader  # stops its workers
        rows.append({
            "label": cfg.name, "num_workers": count,
            "pin_memory": data_cfg.pin_memory and device.type == "cuda",
            "persistent_workers": data_cfg.persistent_workers and count > 0,
            "prefetch_factor": data_cfg.prefetch_factor if count > 0 else None,
            "batch_size": batch_size, "steps": steps, "warmup": warmup,
            "steps_per_epoch": usable // batch_size, "input_shape": "x".join(map(str, cfg.data.target_shape)),
            "device": str(device), "precision": cfg.train.precision,
            "data_wait_ms": 1e3 * statistics.median(waits), "data_wait_ms_max": 1e3 * max(waits),
            "step_ms": 1e3 * statistics.median(totals),
            "wait_fraction": sum(waits) / sum(totals),
            "samples_per_s": batch_size * len(totals) / sum(totals),
        })
    return rows
