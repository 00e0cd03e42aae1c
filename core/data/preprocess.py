"""CT-CLIP's volume preprocessing: NIfTI → HU → target spacing → HU window → [-1, 1] → centre crop / pad.

Axis order. nibabel returns the stored voxel array as ``data[i, j, k]``: ``i``
runs along the image columns (x), ``j`` along the rows (y) and ``k`` across
the slices (z). The model wants (D, H, W) = (slices, rows, columns), so the
array is transposed with axes ``(2, 1, 0)``: ``volume[k, j, i] = data[i, j, k]``,
and a model input is ``volume[None]`` = (C=1, D, H, W). (CT-CLIP's own loader
uses ``transpose(2, 0, 1)``, i.e. (slices, columns, rows): the same volume
transposed in-plane.) The stored orientation is kept as is, as CT-CLIP does;
no reorientation by the affine.

Spacing comes from the metadata CSV (ZSpacing, XYSpacing) when it has a row
for the volume, else from the header's voxel sizes; HU from the metadata's
RescaleSlope/RescaleIntercept, else the header's ``scl_slope``/``scl_inter``.
Resampling is trilinear (``torch.nn.functional.interpolate``, as CT-CLIP)
to ``round(shape × spacing / target_spacing)`` voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from core.config import DataConfig
from core.data.intensity import apply_intensity

NIFTI_TO_DHW = (2, 1, 0)  # data[i, j, k] (columns, rows, slices) → volume[k, j, i] (D, H, W)
INT16_SCALE = 32767.0  # int16 cache: round(value × INT16_SCALE) for values in [-1, 1]


class BadVolume(Exception):
    """A volume that cannot be used; ``reason`` is a key of ``core.data.ctrate.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Preprocessing:
    """The settings that decide a preprocessed volume's values (and so the cache key)."""

    target_spacing: tuple[float, float, float]
    target_shape: tuple[int, int, int]
    hu_window: tuple[float, float]
    intensity: str = "ctclip"  # core.data.intensity: how windowed HU become model values

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Preprocessing:
        """The preprocessing part of a DataConfig."""
        return cls(tuple(map(float, cfg.target_spacing)), tuple(map(int, cfg.target_shape)),
                   (float(cfg.hu_window[0]), float(cfg.hu_window[1])), cfg.intensity)


@dataclass
class NiftiVolume:
    """A decoded NIfTI in model axis order: stored values (D, H, W), header scaling and spacing (mm, D, H, W)."""

    raw: np.ndarray
    slope: float
    intercept: float
    spacing: tuple[float, float, float]


def load_nifti(path: str | Path) -> NiftiVolume:
    """Decode a NIfTI file to its unscaled voxel array in (D, H, W) order; ``BadVolume`` if unusable.

    Trailing length-1 axes beyond the third (an (X, Y, Z, 1) file) are dropped;
    any other shape than 3D is ``bad_dims``.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadVolume("empty_file", "0 bytes")
    try:
        image = nib.load(path)
        raw = np.asarray(image.dataobj.get_unscaled())
        slope, intercept = float(image.dataobj.slope), float(image.dataobj.inter)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except Exception as err:  # nibabel, gzip and zlib raise many types for a corrupt or truncated file
        raise BadVolume("unreadable", f"{type(err).__name__}: {err}") from None
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise BadVolume("bad_dims", f"array shape {raw.shape}, expected 3 axes (X, Y, Z)")
    if min(raw.shape) < 2:
        raise BadVolume("bad_dims", f"array shape {raw.shape} has an axis shorter than 2 voxels")
    spacing = (zooms[2], zooms[1], zooms[0])
    return NiftiVolume(raw.transpose(NIFTI_TO_DHW), slope, intercept, spacing)


def to_hu(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values → Hounsfield units: ``raw × slope + intercept`` in float32; ``BadVolume`` on NaN/inf."""
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(hu).all():
        bad = int(hu.size - np.isfinite(hu).sum())
        raise BadVolume("non_finite", f"{bad} of {hu.size} voxels are NaN or infinite")
    return hu


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...],
                    target_spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """Voxels after resampling: ``round(n × spacing / target_spacing)`` per axis (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing, strict=True))


def resample(volume: np.ndarray, spacing: tuple[float, ...], target_spacing: tuple[float, ...]) -> np.ndarray:
    """Trilinear resampling of a (D, H, W) float32 volume from ``spacing`` to ``target_spacing`` (mm)."""
    size = resampled_shape(volume.shape, spacing, target_spacing)
    if size == volume.shape:
        return volume
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU to [low, high] and map that range linearly onto [-1, 1]."""
    clipped = np.clip(hu, low, high)
    return ((clipped - low) * (2.0 / (high - low)) - 1.0).astype(np.float32)


def crop_or_pad(volume: np.ndarray, shape: tuple[int, ...], pad_value: float = -1.0) -> np.ndarray:
    """Centre-crop or pad (with ``pad_value``) each axis to ``shape``; an odd excess goes to the end."""
    out = np.full(shape, pad_value, dtype=volume.dtype)
    src, dst = [], []
    for have, want in zip(volume.shape, shape, strict=True):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def preprocess_array(hu: np.ndarray, spacing: tuple[float, ...], prep: Preprocessing) -> np.ndarray:
    """A (D, H, W) HU volume at ``spacing`` → the model's float32 (D, H, W) volume in [-1, 1]."""
    resampled = resample(hu, spacing, prep.target_spacing)
    return crop_or_pad(apply_intensity(prep.intensity, resampled, prep.hu_window), prep.target_shape, pad_value=-1.0)


def preprocess_file(path: str | Path, prep: Preprocessing, slope: float | None = None,
                    intercept: float | None = None, spacing: tuple[float, float, float] | None = None) -> np.ndarray:
    """Decode and preprocess one NIfTI; metadata values win over the header's when given.

    Returns float32 (D, H, W) in [-1, 1]; raises ``BadVolume`` for an unusable file.
    """
    volume = load_nifti(path)
    if slope is None or intercept is None:
        slope, intercept = volume.slope, volume.intercept
    if spacing is None:
        spacing = volume.spacing
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BadVolume("bad_spacing", f"voxel spacing {spacing} mm")
    return preprocess_array(to_hu(volume.raw, slope, intercept), spacing, prep)


def encode(volume: np.ndarray, dtype: str) -> np.ndarray:
    """A [-1, 1] float32 volume in the cache's storage dtype (``float16``, or ``int16`` scaled by 32767)."""
    if dtype == "int16":
        return np.round(volume * INT16_SCALE).astype(np.int16)
    return volume.astype(np.float16)


def decode(stored: np.ndarray) -> torch.Tensor:
    """The inverse of ``encode``: a cached (memory-mapped) array → float32 tensor in [-1, 1].

    One copy out of the memory map, then torch's float16/int16 → float32
    conversion, which is several times faster than numpy's.
    """
    tensor = torch.from_numpy(np.array(stored)).float()
    return tensor.mul_(1.0 / INT16_SCALE) if stored.dtype == np.int16 else tensor
