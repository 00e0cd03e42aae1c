"""Every ablation axis reaches every encoder that declares it, for every value its layer registry holds.

The cases come from the registries themselves: each registered encoder × each axis it declares
(``encoder_axes``) × each name in that axis's layer registry. A new encoder or a new attention / norm / MLP
value is covered without writing a test. For each case the encoder is built while the axis registry is
watched, so the test sees what was really built:

- every lookup in the axis registry during the build asks for the configured value (no hard-coded name);
- every norm / MLP module the registry built carries that value, is part of the encoder and runs in its
  forward pass; every attention call in the forward pass goes through the configured kernel;
- every value builds the same number of axis layers (each block takes the axis, whatever its value);
- on the same input with the same weights, two values with different math give different outputs and
  two values with the same math (the attention kernels) give the same output.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from core.config import load_config
from core.encoders import create_encoder, encoder_axes
from core.layers.attention import flash_unavailable_reason
from core.registry import ATTENTION, ENCODERS, MLP, NORM, ConfigError, Registry

SHAPE = (16, 32, 32)
REGISTRIES: dict[str, Registry] = {"attention": ATTENTION, "norm": NORM, "mlp": MLP}
# Values of one axis that compute the same function (they differ in kernel, not in math).
SAME_MATH: dict[str, list[set[str]]] = {"attention": [{"standard", "sdpa", "flash"}]}
AXIS_TAG = "_ctlab_axis_value"

CASES = [(name, axis, value) for name in ENCODERS.names() for axis in encoder_axes(name)
         for value in REGISTRIES[axis].names()]


def _unavailable(axis: str, value: str) -> str | None:
    return flash_unavailable_reason() if (axis, value) == ("attention", "flash") else None


class Watch:
    """Wraps an axis registry's ``get`` while an encoder is built; records lookups, built modules and calls."""

    def __init__(self, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lookups: list[str] = []
        self.modules: list[nn.Module] = []
        self.calls: list[str] = []
        original = registry.get

        def get(name: str) -> Any:
            entry = original(name)
            self.lookups.append(name)
            return self._wrap(name, entry)

        monkeypatch.setattr(registry, "get", get)

    def _wrap(self, name: str, entry: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = entry(*args, **kwargs)
            if isinstance(out, nn.Module):  # a layer builder (norm, mlp): tag what it built
                setattr(out, AXIS_TAG, name)
                self.modules.append(out)
            else:  # a kernel (attention): record that the forward pass went through it
                self.calls.append(name)
            return out

        return wrapped


def _build(name: str, axis: str, value: str, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, Watch]:
    """Encoder ``name`` with ``axis=value``, seeded, in eval mode, built under a Watch of the axis registry."""
    cfg = load_config(None, [f"model.encoder={name}", f"data.target_shape={list(SHAPE)}",
                             f"model.{axis}={value}"]).model
    cfg.preset = "tiny"
    with monkeypatch.context() as patch:
        watch = Watch(REGISTRIES[axis], patch)
        torch.manual_seed(0)
        try:
            encoder = create_encoder(cfg, SHAPE)
        except ConfigError as err:
            if "has no preset 'tiny'" not in str(err):
                raise
            cfg.preset = None  # the encoder's own (small) preset, e.g. the DCFormer variants
            watch.lookups.clear()
            watch.modules.clear()
            torch.manual_seed(0)
            encoder = create_encoder(cfg, SHAPE)
    return encoder.eval(), watch


def _volumes() -> torch.Tensor:
    return torch.rand(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _forward(encoder: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder(_volumes())


def _same_math(axis: str, a: str, b: str) -> bool:
    return a == b or any({a, b} <= group for group in SAME_MATH.get(axis, []))


def _set_weights_by_name(encoder: nn.Module) -> nn.Module:
    """Overwrite every parameter with values drawn from a seed of its name, so two builds share equal weights
    wherever they share a parameter, and no layer is muted by its init (layer scale 1e-6, zero biases)."""
    with torch.no_grad():
        for pname, param in encoder.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_(1 + 0.2 * noise)
    return encoder


@pytest.mark.parametrize(("name", "axis", "value"), CASES)
def test_axis_value_reaches_every_layer(name, axis, value, monkeypatch):
    if reason := _unavailable(axis, value):
        pytest.skip(f"attention '{value}' cannot run here: {reason}")
    encoder, watch = _build(name, axis, value, monkeypatch)

    assert watch.lookups, f"{name}: building with model.{axis}={value} never asked the {axis} registry"
    assert set(watch.lookups) == {value}, f"{name}: model.{axis}={value} but the build asked for {watch.lookups}"

    hooks, ran = [], set()
    if axis == "attention":
        watch.calls.clear()
    else:
        inside = {id(m) for m in encoder.modules()}
        assert watch.modules and all(id(m) in inside for m in watch.modules), \
            f"{name}: a {axis} layer built for the encoder is not part of it"
        tagged = [m for m in encoder.modules() if hasattr(m, AXIS_TAG)]
        assert {getattr(m, AXIS_TAG) for m in tagged} == {value}
        hooks = [m.register_forward_hook(lambda mod, *_: ran.add(id(mod))) for m in tagged]
    if axis == "attention":  # the kernel each attention layer names, where it names one
        named = {m.kernel_name for m in encoder.modules() if hasattr(m, "kernel_name")}
        assert named <= {value}, f"{name}: model.attention={value} but layers name kernels {named}"
    out = _forward(encoder)  # kernels looked up at build time record their calls in watch.calls
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, encoder.out_dim) and torch.isfinite(out).all()
    if axis == "attention":
        assert watch.calls and set(watch.calls) == {value}, \
            f"{name}: forward with model.attention={value} ran kernels {sorted(set(watch.calls))}"
    else:
        silent = [type(m).__name__ for m in tagged if id(m) not in ran]
        assert not silent, f"{name}: {axis} layers built for {value} never ran in forward: {silent}"


@pytest.mark.parametrize(("name", "axis", "value"), CASES)
def test_axis_values_differ_exactly_where_their_math_does(name, axis, value, monkeypatch):
    """Against every other value of the axis: same layer count; different output unless the math is the same."""
    others = [v for v in REGISTRIES[axis].names() if v != value and not _unavailable(axis, v)]
    if reason := _unavailable(axis, value):
        pytest.skip(f"attention '{value}' cannot run here: {reason}")
    if not others:
        pytest.skip(f"the {axis} registry has one usable value")
    encoder, watch = _build(name, axis, value, monkeypatch)
    out = _forward(_set_weights_by_name(encoder))
    count = len(watch.modules) if axis != "attention" else len(watch.lookups)
    for other in others:
        twin, twin_watch = _build(name, axis, other, monkeypatch)
        twin_count = len(twin_watch.modules) if axis != "attention" else len(twin_watch.lookups)
        assert twin_count == count, f"{name}: {axis}={value} builds {count} layers, {axis}={other} {twin_count}"
        twin_out = _forward(_set_weights_by_name(twin))
        if _same_math(axis, value, other):
            torch.testing.assert_close(twin_out, out, atol=1e-5, rtol=1e-4,
                                       msg=f"{name}: {axis}={value} and {other} compute the same function")
        else:
            assert not torch.allclose(twin_out, out, atol=1e-5, rtol=1e-3), \
                f"{name}: {axis}={value} and {axis}={other} give the same output on the same input and weights"
