"""Performance options side by side: the baseline, the modern configuration, each option on top, all of them.

The baseline is CT-CLIP's transformer (standard attention + GELU + LayerNorm,
the seed paper's name for it; its "GELU" is the encoder's own baseline
feed-forward, ``baseline_axes``: CT-CLIP's GEGLU in CT-ViT, a GELU MLP in the
others), the modern configuration the seed paper's swap (sdpa + SwiGLU +
RMSNorm). Each
performance option is a set of config overrides (``OPTIONS``) measured on top
of the modern configuration alone, then all of them together, in one
``core.bench.model.compare`` run (repeats alternating across configs), so every
option's effect is read against the same modern row: an option pays when it
cuts peak memory or step time there (``verdict``).

``largest_batch`` finds, on a GPU, the largest batch a config trains at
(doubling, then bisecting, catching out-of-memory), and ``max_batch_table``
measures each config at its own largest batch: samples/s at the batch that
fits is what a memory saving buys.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from core.bench.model import BenchSubject
from core.bench.probes import bench_device, timed
from core.config import Config, load_config
from core.encoders import encoder_axes
from core.registry import ConfigError, closest

BASELINE_AXES = {"model.attention": "standard", "model.mlp": "gelu", "model.norm": "layernorm"}
MODERN_AXES = {"model.attention": "sdpa", "model.mlp": "swiglu", "model.norm": "rmsnorm"}
BASELINE, MODERN = "SA+GELU+LN", "SDPA+SwiGLU+RMS"

# option → the overrides it adds to the modern configuration
OPTIONS: dict[str, dict[str, Any]] = {
    "bf16": {"train.precision": "bf16"},
    "fp16": {"train.precision": "fp16"},
    "grad-ckpt": {"model.grad_checkpointing": True},
    "conv-patch": {"model.encoder_args.patch_embed": "conv"},
    "compile": {"train.compile": True},
    "sdpa-flash": {"model.sdpa_backend": "flash"},
    "sdpa-math": {"model.sdpa_backend": "math"},
    "no-position-bias": {"model.encoder_args.position_bias": "none"},  # the seed paper's CT-ViT (no CPB)
    "no-vq": {"model.encoder_args.codebook_size": 0},  # CT-ViT without vector quantisation
}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A change smaller than this is within the noise of a shared machine: the option does not pay for it.
PAYS_MARGIN = 0.03


def check_options(options: Sequence[str]) -> list[str]:
    """``options`` as a list, each a key of ``OPTIONS``; a ConfigError naming the closest otherwise."""
    for name in options:
        if name not in OPTIONS:
            raise ConfigError(f"unknown performance option '{name}'{closest(name, list(OPTIONS))} "
                              f"(choices: {', '.join(OPTIONS)})")
    return list(options)


def _overrides(mapping: Mapping[str, Any]) -> list[str]:
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in mapping.items()]


def baseline_axes(base: Sequence[str]) -> dict[str, str]:
    """The baseline row's axes for the encoder ``base`` names: standard attention, LayerNorm, and the encoder's own
    default feed-forward when that is CT-CLIP's GEGLU (CT-ViT, whose "GELU" baseline in the seed paper is GEGLU),
    else GELU."""
    mlp = encoder_axes(load_config(None, list(base)).model.encoder).get("mlp")
    return {**BASELINE_AXES, "model.mlp": "geglu"} if mlp == "geglu" else dict(BASELINE_AXES)


def option_configs(
    base: Sequence[str],
    options: Sequence[str],
    precision: str = "fp32",
    extra_baselines: Sequence[str] = (),
) -> dict[str, Config]:
    """The configs of an options table, labelled: the baseline (``baseline_axes``) and the modern configuration at
    ``precision``,
    the baseline again at each of ``extra_baselines`` (other precisions), the modern one with each option,
    and with all options together (when there are two or more). ``base`` = dotted overrides shared by all."""
    options = check_options(options)
    common = [*base, f"train.precision={precision}"]
    baseline = _overrides(baseline_axes(base))
    rows: dict[str, list[str]] = {BASELINE: [*common, *baseline]}
    for other in extra_baselines:
        rows[f"{BASELINE} {other}"] = [*common, *baseline, f"train.precision={other}"]
    modern = [*common, *_overrides(MODERN_AXES)]
    rows[MODERN] = modern
    for name in options:
        rows[f"{MODERN} +{name}"] = [*modern, *_overrides(OPTIONS[name])]
    if len(options) > 1:
        combined = {k: v for name in options for k, v in OPTIONS[name].items()}
        rows[f"{MODERN} +all"] = [*modern, *_overrides(combined)]
    return {label: load_config(None, [*overrides, f"name={label}"]) for label, overrides in rows.items()}


def verdict(memory_ratio: float, speedup: float, margin: float = PAYS_MARGIN) -> str:
    """Whether a change pays, read against its reference: ``memory``, ``speed``, both, or ``no``."""
    gains = [name for name, ok in (("memory", memory_ratio < 1 - margin), ("speed", speedup > 1 + margin)) if ok]
    return " + ".join(gains) or "no"


def against_modern(comparison: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per option row of an options ``compare``: its memory ratio and step speed-up to the modern row, and the
    verdict. Empty when the modern row was not measured."""
    results = comparison["results"]
    if MODERN not in results:
        return {}
    modern = results[MODERN]
    out = {}
    for label, record in results.items():
        if not label.startswith(f"{MODERN} +"):
            continue
        memory = record["peak_memory_mb"] / modern["peak_memory_mb"]
        speedup = modern["step_ms"] / record["step_ms"]
        out[label] = {"memory_vs_modern": memory, "speedup_vs_modern": speedup, "pays": verdict(memory, speedup)}
    return out


# --------------------------------------------------------------------------- the largest batch that fits


def _fits(subject: BenchSubject, batch_size: int) -> bool:
    """Whether one training step at ``batch_size`` runs without running out of device memory."""
    try:
        subject.set_batch(batch_size)
        subject.train_step()
        torch.cuda.synchronize(subject.device)
        return True
    except torch.OutOfMemoryError:
        return False


def _release(subject: BenchSubject) -> None:
    """Free what a failed step left behind: gradients, the batch, the grad scaler's half-done state."""
    subject.optimizer.zero_grad(set_to_none=True)
    subject.volumes = subject.tokens = None
    subject.scaler = torch.amp.GradScaler(subject.device.type, enabled=subject.cfg.train.precision == "fp16")
    gc.collect()
    torch.cuda.empty_cache()


def search_largest(fits: Callable[[int], bool], limit: int, tolerance: float = 1 / 16) -> int:
    """The largest ``n`` in [1, ``limit``] with ``fits(n)``, assuming whatever fits a larger batch fits a smaller
    one: doubling from 1, then bisecting until the gap is within ``tolerance`` of the answer. 0 if 1 fails."""
    fit, fail = 0, limit + 1
    batch = 1
    while batch <= limit:
        if not fits(batch):
            fail = batch
            break
        fit, batch = batch, batch * 2
    while fail - fit > max(1, int(fit * tolerance)):
        middle = (fit + fail) // 2
        fit, fail = (middle, fail) if fits(middle) else (fit, middle)
    return fit


def largest_batch(subject: BenchSubject, limit: int, tolerance: float = 1 / 16) -> int:
    """The largest batch (≤ ``limit``) one training step of ``subject`` fits in on its GPU (``search_largest``
    over real steps, catching out-of-memory). 0 when not even one volume fits."""
    if subject.device.type != "cuda":
        raise ConfigError("the largest-batch search needs a CUDA device: a CPU out of memory is a killed process")

    def fits(batch: int) -> bool:
        ok = _fits(subject, batch)
        if not ok:
            _release(subject)
        return ok

    return search_largest(fits, limit, tolerance)


def _measure_at(subject: BenchSubject, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Peak memory, median step time and samples/s of full training steps at ``batch``."""
    subject.set_batch(batch)
    for _ in range(warmup):
        subject.train_step()
    peak = subject.peak_memory_bytes()
    times = sorted(timed(subject.train_step, subject.device)[1] for _ in range(max(1, repeats)))
    step_ms = times[len(times) // 2]
    return {"peak_memory_mb": peak / 2**20, "step_ms": step_ms, "samples_per_s": batch / (step_ms / 1e3)}


def max_batch_table(
    configs: Mapping[str, Config],
    baseline: str,
    limit: int = 256,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Each config alone on the GPU at its largest batch: ``{label: {max_batch, peak_memory_mb, step_ms,
    samples_per_s, throughput_ratio}}`` (throughput relative to ``baseline`` at its own largest batch)."""
    device = bench_device(device)
    rows: dict[str, dict[str, Any]] = {}
    for label, cfg in tqdm(configs.items(), desc="largest batch", unit="config", disable=not progress):
        subject = BenchSubject(cfg, 1, device)
        batch = largest_batch(subject, limit)
        row: dict[str, Any] = {"label": label, "max_batch": batch}
        if batch:
            try:
                row.update(_measure_at(subject, batch, repeats, warmup))
            except torch.OutOfMemoryError:  # the search's last fit did not hold up when repeated
                row["status"] = "out of memory when measured at this batch"
        rows[label] = row
        del subject
        gc.collect()
        torch.cuda.empty_cache()
    base = rows.get(baseline, {}).get("samples_per_s")
    for row in rows.values():
        row["throughput_ratio"] = row["samples_per_s"] / base if base and "samples_per_s" in row else None
    return rows


# --------------------------------------------------------------------------- the patch embedding alone


def _measure_embedding(encoder: torch.nn.Module, volumes: torch.Tensor, dtype: torch.dtype | None, repeats: int,
                       device: torch.device) -> dict[str, float]:
    """Forward / backward ms, peak bytes over forward + backward, and bytes kept for backward of
    ``encoder.embed_patches`` on ``volumes`` (autocast to ``dtype`` unless None)."""
    from core.bench.probes import peak_increase

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return encoder.embed_patches(volumes)

    def step() -> None:
        out = forward()
        out.backward(torch.ones_like(out))

    step()
    fwd, bwd = [], []
    for _ in range(max(1, repeats)):
        encoder.zero_grad(set_to_none=True)
        out, ms = timed(forward, device)
        fwd.append(ms)
        grad = torch.ones_like(out)
        bwd.append(timed(partial(out.backward, grad), device)[1])
        out = grad = None
    encoder.zero_grad(set_to_none=True)
    _, peak = peak_increase(step, device)
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != volumes.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        forward()
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd), "peak_memory_mb": peak / 2**20,
            "saved_mb": sum(saved.values()) / 2**20}


def patch_embed_table(
    base: Sequence[str],
    precisions: Sequence[str] = ("fp32", "bf16"),
    batch_size: int = 1,
    repeats: int = 3,
    device: str | torch.device = "auto",
) -> list[dict[str, Any]]:
    """CT-ViT's patch embedding alone, ``linear`` vs ``conv``, per precision: its forward and backward ms (median
    of ``repeats`` after one warm-up), the peak of tensor bytes over forward + backward beyond the input, and the
    bytes it keeps for backward. Small enough to run at CT-CLIP's full 240 × 480 × 480 on a CPU. ``base`` =
    dotted overrides naming the preset and ``data.target_shape``."""
    from core.encoders import create_encoder

    device = bench_device(device)
    rows = []
    for precision in precisions:
        for embed in ("linear", "conv"):
            cfg = load_config(None, [*base, f"model.encoder_args.patch_embed={embed}", f"train.precision={precision}"])
            shape = tuple(cfg.data.target_shape)
            volumes = torch.rand(batch_size, 1, *shape, device=device).mul_(2).sub_(1)
            figures = _measure_embedding(create_encoder(cfg.model, shape).to(device), volumes,
                                         _AUTOCAST.get(precision), repeats, device)
            rows.append({"label": f"{embed} {precision}", "patch_embed": embed, "precision": precision,
                         "input_shape": "x".join(map(str, shape)), "batch_size": batch_size,
                         "volume_mb": volumes.numel() * 4 / 2**20, **figures})
    return rows
