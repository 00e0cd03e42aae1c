"""The encoder registry API: ``register_encoder``, ``create_encoder``, presets and axes.

An image encoder is a module mapping a volume batch (B, 1, D, H, W) to
features (B, out_dim); the CLIP model projects them to the shared latent.
Each encoder declares which ablation axes (attention, norm, mlp) it takes and
its defaults for them; a config that sets an axis the encoder lacks is
rejected by name, and a matrix lists such a cell as skipped. An encoder may
also declare ``conflicts(cfg, axes) -> reasons`` for combinations of its own
settings and the axes it cannot run (CT-ViT: ``flash`` with a position bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from core.config import ModelConfig, _build
from core.layers.attention import set_sdpa_backend
from core.registry import ENCODERS, ConfigError, closest

AXES = ("attention", "norm", "mlp")
Builder = Callable[[ModelConfig, tuple[int, int, int]], nn.Module]
Conflicts = Callable[[ModelConfig, dict[str, str]], list[str]]
A = TypeVar("A")


def register_encoder(name: str, axes: Mapping[str, str] | None = None,
                     conflicts: Conflicts | None = None) -> Callable[[Builder], Builder]:
    """Register ``builder(model_cfg, input_shape) -> nn.Module`` as encoder ``name``.

    ``axes`` maps each ablation axis the encoder takes to its default value,
    e.g. ``{"attention": "sdpa", "norm": "layernorm", "mlp": "gelu"}``;
    ``conflicts(model_cfg, resolved_axes)`` lists why a config cannot be built.
    """
    return ENCODERS.register(name, axes=dict(axes or {}), conflicts=conflicts)


def encoder_axes(name: str) -> dict[str, str]:
    """The axes encoder ``name`` takes, with their defaults."""
    return ENCODERS.meta(name)["axes"]


def unsupported_axes(cfg: ModelConfig) -> list[str]:
    """Reasons this config sets axes its encoder does not take (empty when it is valid)."""
    takes = encoder_axes(cfg.encoder)
    reasons = [
        f"encoder '{cfg.encoder}' has no {axis} axis (model.{axis}={getattr(cfg, axis)}); "
        f"it takes: {', '.join(takes) or 'none of attention/norm/mlp'}"
        for axis in AXES
        if getattr(cfg, axis) is not None and axis not in takes
    ]
    conflicts = ENCODERS.meta(cfg.encoder).get("conflicts")
    if reasons or conflicts is None:
        return reasons
    return conflicts(cfg, {axis: getattr(cfg, axis) or default for axis, default in takes.items()})


def resolve_axes(cfg: ModelConfig) -> dict[str, str]:
    """The axis values an encoder is built with: the config's, else the encoder's defaults."""
    if reasons := unsupported_axes(cfg):
        raise ConfigError("; ".join(reasons) + " — change that key or pick an encoder that takes it")
    return {axis: getattr(cfg, axis) or default for axis, default in encoder_axes(cfg.encoder).items()}


def resolve_preset(cfg: ModelConfig, presets: Mapping[str, A], default: str) -> A:
    """The encoder's preset named by ``model.preset`` (or ``default``) with ``model.encoder_args`` applied."""
    name = cfg.preset or default
    if name not in presets:
        raise ConfigError(
            f"model.preset: encoder '{cfg.encoder}' has no preset '{name}'{closest(name, list(presets))} "
            f"(choices: {', '.join(presets)})"
        )
    base = dataclasses.asdict(presets[name])
    try:
        return _build(type(presets[name]), {**base, **cfg.encoder_args}, "model.encoder_args.")
    except ConfigError as err:
        raise ConfigError(f"{err} [encoder '{cfg.encoder}']") from None


def create_encoder(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Build the image encoder named by ``cfg.encoder`` for volumes of ``input_shape`` (D, H, W)."""
    builder = ENCODERS.get(cfg.encoder)
    resolve_axes(cfg)
    encoder = builder(cfg, tuple(input_shape))
    set_sdpa_backend(encoder, cfg.sdpa_backend)  # every encoder's sdpa layers, whatever builds them
    if not isinstance(getattr(encoder, "out_dim", None), int):
        raise TypeError(f"encoder '{cfg.encoder}' must set an integer attribute out_dim")
    return encoder


def preset_fields(args: Any) -> dict[str, Any]:
    """A preset's values as a plain dict (for logging)."""
    return dataclasses.asdict(args)
