"""Measuring primitives of the efficiency bench: FLOPs, wall time and peak tensor memory.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: matrix products
and convolutions, 2 FLOPs per multiply-add (a Linear of ``in → out`` on
``batch`` rows is 2·in·out·batch); element-wise work (softmax, norms,
activations) is not counted, as in every published GFLOPs table.

Peak memory is the peak of bytes held by live tensors during one call, over
what was allocated before it:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (tensor bytes, not the caching allocator's reserve).
- CPU: torch exposes no peak counter for its CPU allocator, and RSS mixes in
  the Python heap and malloc's reuse of freed pages. So the call runs under
  ``torch.profiler`` with ``profile_memory=True``: every allocation and free
  of torch's CPU allocator is an event with its byte count (frees negative),
  and the peak of their running sum in time order is the peak of tensor bytes
  allocated during the call and alive at once. Same quantity as on CUDA.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from core.distributed import resolve_device
from core.registry import ConfigError

MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated",
    "cpu": "torch.profiler peak of live CPU tensor bytes",
}


def bench_device(device: str | torch.device) -> torch.device:
    """``auto`` → the first CUDA GPU when there is one, else the CPU; only CPU and CUDA can be measured."""
    device = resolve_device(str(device))
    if device.type not in MEMORY_MEASURE:
        raise ConfigError(f"bench device '{device}': only cpu and cuda can be measured; use --device cpu or cuda")
    return device


def device_name(device: str | torch.device) -> str:
    """What the bench ran on, in words: the GPU's name and memory, or the CPU's model name and core count."""
    device = bench_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} torch threads"


def count_flops(module: nn.Module, *inputs: Any) -> int:
    """FLOPs of one forward of ``module`` on ``inputs``, as torch's FLOP counter counts them.

    BatchNorms run in eval mode for the count (restored after): their mode
    changes no FLOP torch counts, and train mode refuses a single volume whose
    last feature map is 1×1×1 (one value per channel).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    try:
        for norm in norms:
            norm.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        for norm in norms:
            norm.train()
    return int(counter.get_total_flops())


def fvcore_norm_factor(module: nn.Module) -> int:
    """FLOPs fvcore's ``FlopCountAnalysis`` charges a normalisation layer per input element (0: not a norm).

    fvcore.nn.jit_handles: BatchNorm in training (or without running
    statistics) and LayerNorm / GroupNorm / InstanceNorm count 5 per element
    with an affine transform, 4 without; BatchNorm in eval counts 2 (1).
    """
    affine = getattr(module, "weight", None) is not None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            return 5 if affine else 4
        return 2 if affine else 1
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return 5 if affine else 4
    return 0


def count_macs_fvcore(module: nn.Module, *inputs: Any) -> int:
    """Multiply-adds of one forward as fvcore counts them (the convention of the DCFormer paper's "GFLOPs").

    Matrix products and convolutions are torch's FLOP count / 2 (fvcore counts
    one multiply-add as one FLOP, bias adds not at all); on top, every
    ``nn`` normalisation layer adds ``fvcore_norm_factor`` × its input
    elements. So a train-mode model — the state the authors count in —
    carries 5 × the input of each BatchNorm. Other element-wise work
    (activations, pooling, additions) counts zero in both; norms written
    without these modules (RMSNorm) count zero, as fvcore has no rule for them.
    """
    norm_flops = 0
    factors = {m: fvcore_norm_factor(m) for m in module.modules() if fvcore_norm_factor(m)}  # before count_flops

    def count_norm(norm: nn.Module, args: tuple[Any, ...]) -> None:  # ... runs BatchNorms in eval mode
        nonlocal norm_flops
        norm_flops += factors[norm] * args[0].numel()

    hooks = [m.register_forward_pre_hook(count_norm) for m in factors]
    try:
        flops = count_flops(module, *inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return flops // 2 + norm_flops


def gflops(module: nn.Module, *inputs: Any) -> float:
    """``count_flops`` in units of 10⁹."""
    return count_flops(module, *inputs) / 1e9


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn()`` and return its result with its duration in ms (CUDA events on a GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    start_s = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start_s) * 1e3


def peak_increase(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn()``; return its result and the peak of tensor bytes it allocated and held at once."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    # Kineto logs every profiler start/stop at its lowest level; level 6 keeps CLI output readable.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
