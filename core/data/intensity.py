"""Intensity normalisations by name (``data.intensity``): resampled HU → the model's values in [-1, 1].

- ``ctclip`` (default): CT-CLIP's — clip to ``data.hu_window`` and map it
  linearly onto [-1, 1]; at the default window [-1000, 1000] that is
  ``clip(x, -1000, 1000) / 1000``.
- ``dcformer``: DCFormer's (``Dataset/Datasets.py`` of github.com/mirthAI/DCFormer)
  — ``(clip(x, -1000, 200) + 400) / 600``, its own fixed window (−1000 HU →
  −1, 200 HU → 1), so ``data.hu_window`` stays at its default.
  (DCFormer also clips to ±1000 HU before resampling; here the window is
  applied after resampling, for every normalisation alike.)

Both put the window's bottom at −1, the value crops are padded with. The
choice is part of the preprocessing cache key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.registry import INTENSITY

DCFORMER_WINDOW = (-1000.0, 200.0)


@INTENSITY.register("ctclip")
def ctclip(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """CT-CLIP: clip HU to ``hu_window`` = [low, high] and map that range linearly onto [-1, 1]."""
    low, high = float(hu_window[0]), float(hu_window[1])
    clipped = np.clip(hu, low, high)
    return ((clipped - low) * (2.0 / (high - low)) - 1.0).astype(np.float32)


@INTENSITY.register("dcformer", window=DCFORMER_WINDOW)
def dcformer(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """DCFormer: ``(clip(HU, -1000, 200) + 400) / 600`` (its fixed window; ``hu_window`` is not used)."""
    return ((np.clip(hu, *DCFORMER_WINDOW) + 400.0) / 600.0).astype(np.float32)


def apply_intensity(name: str, hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """The normalisation registered as ``name`` applied to a (resampled) HU volume."""
    return INTENSITY.get(name)(hu, hu_window)
