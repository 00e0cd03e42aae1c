"""Row labels of configurations from their components: "SA+GELU+LN, softmax"; run names and search tags.

A run's label is its ``cell_label`` tag when the matrix set one; otherwise it
is built from the run's params with the short names below (the names the
"Modernizing CT-CLIP" tables use). An axis left unset (``None``) takes the
encoder's default; an axis the encoder does not have is ``n/a`` and left out
of the label. The order of each table below is also the order of rows in
every report: the first name of each axis is the baseline's. In the MLflow
UI a run is named "SA+GELU+LN · softmax" (``run_name``) and carries each axis
value as a tag and param under a short key (``axis_tags``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

from core.config import ModelConfig
from core.registry import ConfigError

log = logging.getLogger(__name__)

NOT_APPLICABLE = "n/a"

# axis → {config value: short name}; the first entry of each is the baseline value.
SHORT_NAMES: dict[str, dict[str, str]] = {
    "encoder": {"ctvit": ""},  # CT-CLIP's encoder is implied; other encoders prefix their name
    "attention": {"standard": "SA", "sdpa": "SDPA", "flash": "FA"},
    "mlp": {"gelu": "GELU", "swiglu": "SwiGLU", "geglu": "GEGLU"},
    "norm": {"layernorm": "LN", "rmsnorm": "RMSNorm"},
    "loss": {"clip": "softmax", "siglip": "sigmoid"},
    "adaptation": {"full": "", "frozen_text": "frozen_text", "lora": "lora"},
}
AXES: tuple[str, ...] = tuple(SHORT_NAMES)
LAYER_AXES = ("attention", "mlp", "norm")  # joined with "+" in a label, in this order
_DEFAULTS = ModelConfig()


def short_name(axis: str, value: str) -> str:
    """The table name of ``value`` on ``axis`` ("flash" → "FA"); unknown values keep their own name."""
    if value == NOT_APPLICABLE:
        return value
    return SHORT_NAMES.get(axis, {}).get(value, value) or value


@functools.cache
def _encoder_defaults(encoder: str) -> dict[str, str] | None:
    """The layer axes ``encoder`` takes with their defaults; None for an encoder this install lacks."""
    from core.encoders import encoder_axes

    try:
        return dict(encoder_axes(encoder))
    except ConfigError:
        log.debug("encoder %r is not registered here; its unset axes are shown as n/a", encoder)
        return None


def _unset(value: object) -> bool:
    return value is None or str(value) in ("", "None", "nan")


def component_values(params: Mapping[str, object]) -> dict[str, str]:
    """Each axis's resolved value for a run's flattened params (``model.attention`` ...).

    Unset layer axes take the encoder's default; axes the encoder lacks are
    ``n/a``. Missing encoder / loss / adaptation take ``ModelConfig``'s defaults.
    """
    values: dict[str, str] = {}
    for axis in ("encoder", "loss", "adaptation"):
        value = params.get(f"model.{axis}")
        values[axis] = str(getattr(_DEFAULTS, axis) if _unset(value) else value)
    takes = None
    for axis in LAYER_AXES:
        value = params.get(f"model.{axis}")
        if _unset(value):
            takes = takes if takes is not None else (_encoder_defaults(values["encoder"]) or {})
            value = takes.get(axis, NOT_APPLICABLE)
        values[axis] = str(value)
    return {axis: values[axis] for axis in AXES}


def config_label(values: Mapping[str, str]) -> str:
    """"SA+GELU+LN, softmax" from ``component_values``; other encoders lead ("vit3d SA+GELU+LN, softmax")."""
    layers = "+".join(short_name(a, values[a]) for a in LAYER_AXES if values[a] != NOT_APPLICABLE)
    encoder = SHORT_NAMES["encoder"].get(values["encoder"], values["encoder"])
    parts = [" ".join(p for p in (encoder, layers) if p), short_name("loss", values["loss"])]
    adaptation = SHORT_NAMES["adaptation"].get(values["adaptation"], values["adaptation"])
    return ", ".join(p for p in [*parts, adaptation] if p)


def component_rank(values: Mapping[str, str]) -> tuple[int, ...]:
    """Sort key putting the baseline components first (each axis in ``SHORT_NAMES`` order, unknown values last)."""
    return tuple(list(SHORT_NAMES[a]).index(values[a]) if values[a] in SHORT_NAMES[a] else len(SHORT_NAMES[a])
                 for a in AXES)


SEARCH_AXES = ("attention", "norm", "mlp", "loss", "encoder", "seed")
"""The short keys every training run carries as tags and params, so ``tags.loss = 'siglip'`` finds runs."""


def axis_tags(params: Mapping[str, object]) -> dict[str, str]:
    """``{attention, norm, mlp, loss, encoder, seed}`` of a run's flattened params, for searching in the UI.

    Values are the config's own names (``siglip``, ``rmsnorm``); an axis the encoder lacks is ``n/a``.
    """
    values = component_values(params)
    seed = params.get("train.seed")
    return {**{a: values[a] for a in SEARCH_AXES if a != "seed"}, "seed": "0" if _unset(seed) else str(seed)}


def run_name(values: Mapping[str, str], extras: Mapping[str, object] | None = None) -> str:
    """A run's name in the UI: "SA+GELU+LN · softmax", then what else tells it apart ("· seed 1", "· lr 0.001").

    ``values`` comes from ``component_values``; ``extras`` maps short names to the other values the run's matrix
    varies (``{"seed": 1}``), in order.
    """
    parts = [p.strip() for p in config_label(values).split(", ")]
    parts += [f"{key} {value}" for key, value in (extras or {}).items()]
    return " · ".join(p for p in parts if p)
