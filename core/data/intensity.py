"""Stored voxel values → Hounsfield units, decided per volume from what the file holds, then checked.

CT-RATE's files come three ways, and the metadata CSV's RescaleSlope /
RescaleIntercept are right for only one of them:

- v2 (``*_fixed``) files that carry the rescale in the NIfTI header
  (``scl_slope`` / ``scl_inter``): nibabel's scaling gives HU;
- v2 files that already hold HU with a blank header: applying the CSV
  rescale again shifts every voxel by the intercept (CT-CLIP issue #50);
  with Siemens' −8192 every voxel ends up below −1000, a blank volume;
- v1 files holding the scanner's raw values with a blank header: the CSV
  rescale is what makes them HU.

``data.rescale: auto`` decides in that order: the header's scaling when it
has one (anything but none or 1 / 0); otherwise the CSV rescale when the
stored values are raw, i.e. when the rescale puts more voxels into the air
band (−1100…−800 HU: air around the body and the lungs) than the values read
as they are; otherwise the values are already HU. ``metadata``, ``header``
and ``none`` force one reading for every volume. Whatever the reading, the
result is then checked: a volume that is constant, has ≥ 99 % of its voxels
at the HU window's floor or ceiling, or has (almost) no air is not a chest CT
in HU, and is skipped as ``implausible_hu`` rather than trained on.

This module only decodes intensities; windowing and normalisation to the
model's range are ``core.data.preprocess``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_BAND = (-1100.0, -800.0)  # HU of air and aerated lung
MIN_AIR = 0.005  # a chest CT has more of its voxels in AIR_BAND than this
MAX_SATURATED = 0.99  # at or beyond the window's ends
SAMPLE_STRIDE_ABOVE = 2_000_000  # voxels; bigger volumes are judged on every second voxel per axis

# How a volume's HU were obtained: key → what the summary says.
RESCALE_PATHS: dict[str, str] = {
    "header": "the NIfTI header's scaling",
    "metadata": "the metadata CSV's RescaleSlope/RescaleIntercept on the stored values",
    "none": "stored values already in HU",
}


class IntensityError(Exception):
    """The file's values cannot be read as HU; ``reason`` is a key of ``core.data.ctrate.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Rescale:
    """A linear map stored value → HU."""

    slope: float
    intercept: float

    @property
    def identity(self) -> bool:
        """True when it leaves values as they are (1 / 0)."""
        return self.slope == 1.0 and self.intercept == 0.0

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """``raw × slope + intercept`` in float32."""
        return raw.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


def _sample(values: np.ndarray) -> np.ndarray:
    return values[::2, ::2, ::2] if values.ndim == 3 and values.size > SAMPLE_STRIDE_ABOVE else values


def air_fraction(hu: np.ndarray) -> float:
    """Share of voxels in ``AIR_BAND`` (judged on a strided sample of big volumes)."""
    sample = _sample(hu)
    return float(np.count_nonzero((sample >= AIR_BAND[0]) & (sample <= AIR_BAND[1]))) / max(sample.size, 1)


def choose_rescale(raw: np.ndarray, header: Rescale | None, metadata: Rescale | None, mode: str) -> str:
    """Which reading gives HU for this volume: ``header``, ``metadata`` or ``none`` (see the module docstring).

    ``header`` / ``metadata`` are the file's and the CSV's rescale (None when
    absent). A forced ``metadata`` without a CSV rescale is ``IntensityError("no_rescale")``.
    """
    if mode == "metadata" and metadata is None:
        raise IntensityError("no_rescale", "data.rescale is metadata but the metadata CSV has no "
                                           "RescaleSlope/RescaleIntercept for this volume")
    if mode != "auto":
        return mode
    if header is not None and not header.identity:
        return "header"
    if metadata is not None and not metadata.identity:
        sample = _sample(raw)
        if air_fraction(metadata.apply(sample)) > air_fraction(sample.astype(np.float32)):
            return "metadata"
    return "none"


def to_hu_by(path: str, raw: np.ndarray, header: Rescale | None, metadata: Rescale | None) -> np.ndarray:
    """The HU volume for reading ``path`` (a key of RESCALE_PATHS) of the stored values ``raw``."""
    if path == "header":
        return (header or Rescale(1.0, 0.0)).apply(raw)
    if path == "metadata":
        assert metadata is not None
        return metadata.apply(raw)
    return raw.astype(np.float32)


def check_plausible(hu: np.ndarray, window: tuple[float, float], path: str) -> None:
    """``IntensityError("implausible_hu")`` when ``hu`` is not a chest CT in HU: constant, saturated or airless."""
    how = RESCALE_PATHS[path]
    sample = _sample(hu)
    low, high = float(sample.min()), float(sample.max())
    if low == high:
        raise IntensityError("implausible_hu", f"every voxel holds {low:g} HU (read as {how})")
    saturated = float(np.count_nonzero((sample <= window[0]) | (sample >= window[1]))) / sample.size
    if saturated >= MAX_SATURATED:
        raise IntensityError("implausible_hu", f"{saturated:.1%} of voxels at the HU window's floor or ceiling "
                                               f"[{window[0]:g}, {window[1]:g}] (read as {how}); "
                                               "if the reading is wrong, set data.rescale")
    air = air_fraction(hu)
    if air < MIN_AIR:
        raise IntensityError("implausible_hu", f"no air: {air:.2%} of voxels in [{AIR_BAND[0]:g}, {AIR_BAND[1]:g}] "
                                               f"HU (read as {how}); if the reading is wrong, set data.rescale")


def decode_hu(raw: np.ndarray, header: Rescale | None, metadata: Rescale | None, mode: str,
              window: tuple[float, float]) -> tuple[np.ndarray, str]:
    """Stored values → (checked HU volume, the reading taken); ``IntensityError`` when unusable."""
    path = choose_rescale(raw, header, metadata, mode)
    hu = to_hu_by(path, raw, header, metadata)
    if not np.isfinite(hu).all():
        bad = int(hu.size - np.isfinite(hu).sum())
        raise IntensityError("non_finite", f"{bad} of {hu.size} voxels are NaN or infinite")
    check_plausible(hu, window, path)
    return hu, path
