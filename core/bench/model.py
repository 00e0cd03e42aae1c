"""Efficiency bench: params, GFLOPs, peak memory, visual-encoder forward / backward and training-step time.

``measure(cfg, ...)`` benchmarks one config. ``compare({label: cfg}, baseline)``
benchmarks several in one process and adds ratios to the baseline; its
repeats alternate across configs (A, B, A, B, ...), so machine noise lands on
every config alike. Times are the median of the repeats after a warm-up (CUDA
events on a GPU, ``perf_counter`` on CPU); how memory and FLOPs are measured
is described in ``core.bench.probes``.

One repeat = the image encoder's forward on the batch, timed; its backward
from a gradient of ones on its output, timed; then one full training step,
timed — forward of volumes and texts, contrastive loss, backward, gradient
clipping and the AdamW step, in the config's precision, with the trainer's
optimizer (``core.optim``) and adaptation (``core.lora``, for frozen-text / LoRA). Inputs are random
volumes of ``data.target_shape`` in [-1, 1] and short random report-like texts.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from core.bench.probes import MEMORY_MEASURE, bench_device, count_flops, peak_increase, tensor_bytes, timed
from core.config import Config, config_id, config_to_dict, flatten
from core.data.pathologies import PATHOLOGIES
from core.encoders import create_encoder
from core.encoders.base import AXES, resolve_axes
from core.layers.attention import set_sdpa_backend
from core.model import build_model, count_parameters
from core.optim import create_optimizer
from core.registry import ConfigError

TIMES = ("visual_fwd_ms", "visual_bwd_ms", "step_ms")
MLFLOW_METRICS = ("params_total", "params_trainable", "gflops", "peak_memory_mb", "visual_fwd_ms", "visual_bwd_ms",
                  "step_ms", "step_ms_min", "step_ms_max")
_WORDS = [w.lower() for name in PATHOLOGIES for w in name.split()] + [
    "no", "mild", "small", "bilateral", "left", "right", "lower", "upper", "lobe", "is", "present", "seen", "with"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    """``n`` short report-like sentences of random finding words (seeded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=words)).capitalize() + "." for _ in range(n)]


def meta_encoder(cfg: Config) -> tuple[torch.nn.Module, torch.Tensor]:
    """``cfg``'s image encoder and one volume of ``data.target_shape``, on the meta device, for counting.

    The meta device holds no memory and computes nothing, and there every
    attention kernel runs as its math: torch's CPU flash kernel for ``sdpa``
    has no FLOP formula and would count as zero. ``flash`` computes the same
    product as ``sdpa`` and is built as ``sdpa``.
    """
    model_cfg = cfg.model
    if model_cfg.attention == "flash":
        model_cfg = dataclasses.replace(model_cfg, attention="sdpa")
    shape = tuple(cfg.data.target_shape)
    with torch.device("meta"):
        return create_encoder(model_cfg, shape), torch.empty(1, 1, *shape)


def encoder_gflops(cfg: Config) -> float:
    """Forward GFLOPs of the image encoder for one volume of ``data.target_shape`` (counted on the meta device)."""
    return count_flops(*meta_encoder(cfg)) / 1e9


class BenchSubject:
    """One config ready to benchmark: its model, AdamW, a fixed random batch and the recorded times."""

    def __init__(self, cfg: Config, batch_size: int, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg)
        set_sdpa_backend(self.model.image_encoder, cfg.model.sdpa_backend)
        if cfg.model.adaptation != "full":
            from core.lora import apply_adaptation

            apply_adaptation(self.model, cfg.model)
        self.model.to(device).train()
        train = cfg.train
        if train.compile:
            self.model.image_encoder = torch.compile(self.model.image_encoder, mode=train.compile_mode)
        self.optimizer = create_optimizer(self.model, train, device)
        dtype = _DTYPES.get(train.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.set_batch(batch_size)

    def set_batch(self, batch_size: int) -> None:
        """Use a fresh fixed random batch of ``batch_size`` volumes and texts; recorded times start over."""
        self.batch_size = batch_size
        self.volumes = self.tokens = None  # the old batch is freed before the new one is allocated
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        shape = (batch_size, 1, *self.cfg.data.target_shape)
        self.volumes = torch.rand(shape, generator=generator).mul_(2).sub_(1).to(self.device)
        tokens = self.model.tokenize(random_texts(batch_size, self.cfg.train.seed))
        self.tokens = {name: t.to(self.device) for name, t in tokens.items()}
        self.times: dict[str, list[float]] = {name: [] for name in TIMES}

    def visual_forward_backward(self) -> tuple[float, float]:
        """Time the image encoder's forward, then its backward from a gradient of ones (ms, ms)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            features, fwd_ms = timed(lambda: self.model.image_encoder(self.volumes), self.device)
        grad = torch.ones_like(features)
        _, bwd_ms = timed(lambda: features.backward(grad), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        return fwd_ms, bwd_ms

    def train_step(self, volumes: torch.Tensor | None = None,
                   tokens: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One full training step on ``volumes`` and ``tokens`` (default: the fixed batch); returns the loss."""
        volumes = self.volumes if volumes is None else volumes
        tokens = self.tokens if tokens is None else tokens
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(volumes, **tokens)["loss"]
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def repeat(self, record: bool = True) -> None:
        """One repeat: visual forward, visual backward, training step; their times kept when ``record``."""
        fwd_ms, bwd_ms = self.visual_forward_backward()
        _, step_ms = timed(self.train_step, self.device)
        if record:
            for name, value in zip(TIMES, (fwd_ms, bwd_ms, step_ms), strict=True):
                self.times[name].append(value)

    def peak_memory_bytes(self) -> int:
        """Peak tensor bytes of one training step: what the config holds (weights, buffers, optimizer
        state, the batch) plus the peak of what the step allocates (activations, gradients, temporaries).
        Measured in the steady state: AdamW creates its state on its first step, so one runs first if none has."""
        if not self.optimizer.state:
            self.train_step()
        self.optimizer.zero_grad(set_to_none=True)
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        held = tensor_bytes([*self.model.parameters(), *self.model.buffers(), *state, self.volumes,
                             *self.tokens.values()])
        _, increase = peak_increase(self.train_step, self.device)
        return held + increase

    def result(self, label: str, peak_bytes: int, warmup: int) -> dict[str, Any]:
        """The figures of this config as one flat record (plus its flattened config under ``config``)."""
        m = self.cfg.model
        axes = resolve_axes(m)
        medians = {name: statistics.median(values) for name, values in self.times.items()}
        whole, image = count_parameters(self.model), count_parameters(self.model.image_encoder)
        return {
            "label": label, "encoder": m.encoder, "preset": m.preset or "default",
            **{axis: axes.get(axis, "-") for axis in AXES},
            "loss": m.loss, "text_encoder": m.text_encoder,
            "input_shape": "x".join(map(str, self.cfg.data.target_shape)), "batch_size": self.batch_size,
            "device": str(self.device), "precision": self.cfg.train.precision,
            "params_total": whole["total"], "params_trainable": whole["trainable"],
            "image_params_total": image["total"], "image_params_trainable": image["trainable"],
            "gflops": encoder_gflops(self.cfg),
            "peak_memory_mb": peak_bytes / 2**20, "memory_measure": MEMORY_MEASURE[self.device.type],
            **medians,
            "step_ms_min": min(self.times["step_ms"]), "step_ms_max": max(self.times["step_ms"]),
            "samples_per_s": self.batch_size / (medians["step_ms"] / 1e3),
            "repeats": len(self.times["step_ms"]), "warmup": warmup,
            "config_id": config_id(self.cfg), "config": flatten(config_to_dict(self.cfg)),
        }


def ratios(result: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """``result`` relative to ``baseline``: memory and fwd/bwd ratios (<1 = less), step speed-up (>1 = faster)."""
    return {
        "memory_ratio": result["peak_memory_mb"] / baseline["peak_memory_mb"],
        "step_speedup": baseline["step_ms"] / result["step_ms"],
        "visual_fwd_ratio": result["visual_fwd_ms"] / baseline["visual_fwd_ms"],
        "visual_bwd_ratio": result["visual_bwd_ms"] / baseline["visual_bwd_ms"],
    }


def paired_speedups(subject_ms: Sequence[float], baseline_ms: Sequence[float]) -> dict[str, float]:
    """The spread of the step speed-up: min and max over repeats of baseline / subject, each repeat's pair
    measured back to back (repeats alternate across configs), so a noisy moment of the machine hits both."""
    pairs = [b / s for s, b in zip(subject_ms, baseline_ms, strict=True)]
    return {"step_speedup_min": min(pairs), "step_speedup_max": max(pairs)}


def compare(
    configs: Mapping[str, Config],
    baseline: str,
    batch_size: int = 2,
    repeats: int = 5,
    warmup: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark several configs side by side, repeats alternating across them, with ratios to ``baseline``.

    Returns ``{"baseline", "results": {label: record}, "ratios": {label: ratios}, "skipped": {label: why}}``.
    A config whose model cannot be built (ConfigError) or whose first steps fail (out of memory, an input
    too small for its batch norms, ...) is skipped with the reason, unless it is the baseline.
    All models stay resident together, so the device must hold all of them.
    """
    if baseline not in configs:
        raise ConfigError(f"bench baseline '{baseline}' is not among the configs ({', '.join(configs)})")
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError("bench: needs repeats >= 1, warmup >= 0 and batch size >= 1")
    device = bench_device(device)
    subjects: dict[str, BenchSubject] = {}
    skipped: dict[str, str] = {}
    for label, cfg in tqdm(configs.items(), desc="build", unit="config", disable=not progress, leave=False):
        try:
            subjects[label] = BenchSubject(cfg, batch_size, device)
        except ConfigError as err:
            if label == baseline:
                raise
            skipped[label] = str(err)
    per_config = warmup + 1 + repeats
    with tqdm(total=len(subjects) * per_config, desc="bench", unit="step", disable=not progress) as bar:
        peaks: dict[str, int] = {}
        for label, subject in list(subjects.items()):
            done = 0
            try:  # a config that cannot run here (out of memory, too small an input) is listed, not fatal
                for _ in range(warmup):
                    subject.repeat(record=False)
                    bar.update()
                    done += 1
                peaks[label] = subject.peak_memory_bytes()
                bar.update()
            except (RuntimeError, ValueError) as err:
                if label == baseline:
                    raise
                skipped[label] = f"its first step failed ({type(err).__name__}: {str(err).splitlines()[0]})"
                del subjects[label], subject
                bar.total -= per_config - done
                bar.refresh()
        for _ in range(repeats):
            for subject in subjects.values():
                subject.repeat()
                bar.update()
    results = {label: s.result(label, peaks[label], warmup) for label, s in subjects.items()}
    base_ms = subjects[baseline].times["step_ms"]
    return {
        "baseline": baseline,
        "results": results,
        "ratios": {label: {**ratios(r, results[baseline]), **paired_speedups(subjects[label].times["step_ms"], base_ms)}
                   for label, r in results.items()},
        "skipped": skipped,
    }


def measure(
    cfg: Config,
    batch_size: int = 2,
    repeats: int = 5,
    warmup: int = 2,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Benchmark one config: the record ``compare`` gives per config (labelled with ``cfg.name``)."""
    return compare({cfg.name: cfg}, cfg.name, batch_size, repeats, warmup, device, progress)["results"][cfg.name]


def bench_to_mlflow_rows(results: Any, matrix: str | None = None) -> list[dict[str, dict[str, Any]]]:
    """Bench records shaped as MLflow efficiency runs (docs/contracts.md): one ``{"params", "metrics", "tags"}``
    per config, params ``config.*`` (plus ``bench.*``: how it was measured), the contract's metrics and tags.

    ``results`` is a ``compare`` output, a ``{label: record}`` mapping, one record or a list of records.
    The ``cell_id`` tag is the config's ``config_id`` — the id a matrix gives the cell with that config.
    """
    if isinstance(results, Mapping) and "results" in results:
        results = results["results"]
    if isinstance(results, Mapping) and "label" in results:
        results = [results]
    records: Iterable[Mapping[str, Any]] = results.values() if isinstance(results, Mapping) else results
    rows = []
    for r in records:
        tags = {"ctlab.kind": "efficiency", "cell_id": r["config_id"], "cell_label": r["label"]}
        if matrix is not None:
            tags["matrix"] = matrix
        bench = {f"bench.{k}": r[k] for k in ("batch_size", "repeats", "warmup", "device", "memory_measure")}
        rows.append({
            "params": {**{f"config.{k}": v for k, v in r["config"].items()}, **bench},
            "metrics": {k: float(r[k]) for k in MLFLOW_METRICS},
            "tags": tags,
        })
    return rows
