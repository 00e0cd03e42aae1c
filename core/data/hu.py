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
stored values are raw (air near 0, not near −1000); otherwise the values are
already HU. "Raw" is judged on content: of the two readings (as stored, or
with the CSV rescale) the one that looks more like a chest CT in HU wins,
scored as the share of voxels in the air band (−1100…−800 HU: air around the
body and aerated lung) minus the share below it (impossible in HU). Reading
HU data as raw moves air and lung below −1100 and reading raw data as HU
leaves it without air, so the right reading wins by a wide margin. Padding
is left out of the score: scanners fill the corners outside the
reconstruction circle with one value far below everything else (e.g. −2000
or −3024 HU), so a stored minimum that lies ≥ 500 below every other stored
value is not counted. ``metadata``, ``header``
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
PADDING_GAP = 500.0  # a stored minimum this far below every other value is the scanner's padding
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


def padding_value(stored: np.ndarray) -> float | None:
    """The scanner's fill value outside the field of view: the stored minimum when it lies ≥ ``PADDING_GAP``
    below every other stored value (real air is noisy and continuous), else None."""
    low = stored.min()
    rest = stored[stored != low]
    return float(low) if rest.size and float(rest.min()) - float(low) >= PADDING_GAP else None


def reading_score(values: np.ndarray, padding: float | None) -> float:
    """How much ``values`` look like a chest CT in HU: share in ``AIR_BAND`` minus share below it, over the
    voxels that are not ``padding`` (None: all voxels)."""
    kept = values if padding is None else values[values != padding]
    if kept.size == 0:
        return 0.0
    air = np.count_nonzero((kept >= AIR_BAND[0]) & (kept <= AIR_BAND[1]))
    below = np.count_nonzero(kept < AIR_BAND[0])
    return float(air - below) / kept.size


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
        sample = _sample(raw).astype(np.float32)
        padding = padding_value(sample)
        as_stored = reading_score(sample, padding)
        rescaled = reading_score(metadata.apply(sample),
                                 None if padding is None else float(metadata.apply(np.float32(padding))))
        if rescaled > as_stored:
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
