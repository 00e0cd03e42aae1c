"""Image encoders, registered by name; every module in this package is loaded on first use.

A new encoder is a file here with a ``@register_encoder("name", axes=...)`` builder.
"""

import importlib
import pkgutil

from core.encoders.base import create_encoder, encoder_axes, register_encoder, resolve_axes, unsupported_axes

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create_encoder", "encoder_axes", "register_encoder", "resolve_axes", "unsupported_axes"]
