"""CT-CLIP's volume preprocessing: NIfTI → canonical orientation → HU → target spacing → HU window → [-1, 1]
→ centre crop / pad.

Axis order. Every volume is reoriented by its affine
(``core.data.orientation``) to the model's canonical (D, H, W) = (slices
inferior → superior, patient right → left, anterior → posterior): the order
CT-CLIP's model saw (its loaders feed ``permute(2, 0, 1)`` of CT-RATE's LPS
array), whatever orientation the file is stored in. A model input is
``volume[None]`` = (C=1, D, H, W).

Intensities. The stored values become HU by the reading
``core.data.hu`` decides per volume from the file's content (header
scaling, the metadata CSV's rescale, or already HU; ``data.rescale`` forces
one), and a volume that is not a plausible chest CT in HU is skipped.

Spacing comes from the metadata CSV (ZSpacing, XYSpacing) when it has a row
for the volume, else from the header's voxel sizes. Resampling is trilinear
(``torch.nn.functional.interpolate``, as CT-CLIP) to
``round(shape × spacing / target_spacing)`` voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from core.config import DataConfig
from core.data.hu import IntensityError, Rescale, decode_hu
from core.data.intensity import apply_intensity
from core.data.orientation import to_canonical

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
    rescale: str = "auto"  # data.rescale: how stored values become HU (core.data.hu)
    intensity: str = "ctclip"  # core.data.intensity: how windowed HU become model values

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Preprocessing:
        """The preprocessing part of a DataConfig."""
        return cls(tuple(map(float, cfg.target_spacing)), tuple(map(int, cfg.target_shape)),
                   (float(cfg.hu_window[0]), float(cfg.hu_window[1])), rescale=cfg.rescale,
                   intensity=cfg.intensity)


@dataclass
class NiftiVolume:
    """A decoded NIfTI in canonical model order: stored (unscaled) values (D, H, W), the header's scaling
    (1 / 0 when the header has none) and the voxel sizes (mm, D, H, W)."""

    raw: np.ndarray
    slope: float
    intercept: float
    spacing: tuple[float, float, float]

    @property
    def header_rescale(self) -> Rescale:
        """The header's scaling as a Rescale (identity when the header has none)."""
        return Rescale(self.slope, self.intercept)


def load_nifti(path: str | Path) -> NiftiVolume:
    """Decode a NIfTI file to its unscaled voxel array, reoriented by its affine to (D, H, W); ``BadVolume``
    if unusable.

    Trailing length-1 axes beyond the third (an (X, Y, Z, 1) file) are dropped;
    any other shape than 3D is ``bad_dims``.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadVolume("empty_file", "0 bytes")
    try:
        image = nib.load(path)
        raw = np.asarray(image.dataobj.get_unscaled())
        slope, intercept = float(image.dataobj.slope), float(image.dataobj.inter)  # 1 / 0 for a blank header
        zooms = tuple(float(z) for z in image.header.get_zooms())
        affine = image.affine
    except Exception as err:  # nibabel, gzip and zlib raise many types for a corrupt or truncated file
        raise BadVolume("unreadable", f"{type(err).__name__}: {err}") from None
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise BadVolume("bad_dims", f"array shape {raw.shape}, expected 3 axes (X, Y, Z)")
    if min(raw.shape) < 2:
        raise BadVolume("bad_dims", f"array shape {raw.shape} has an axis shorter than 2 voxels")
    canonical, spacing = to_canonical(raw, affine, zooms[:3])
    return NiftiVolume(canonical, slope, intercept, spacing)


def to_hu(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values → Hounsfield units: ``raw × slope + intercept`` in float32; ``BadVolume`` on NaN/inf."""
    hu = Rescale(slope, intercept).apply(raw)
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


@dataclass
class DecodedVolume:
    """One file's checked HU volume in canonical (D, H, W) order, its spacing (mm) and how its HU were read."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    rescale: str  # a key of core.data.hu.RESCALE_PATHS


def decode_file(path: str | Path, prep: Preprocessing, slope: float | None = None, intercept: float | None = None,
                spacing: tuple[float, float, float] | None = None) -> DecodedVolume:
    """Read one NIfTI into checked HU: reoriented, intensities decoded per ``prep.rescale``; ``BadVolume`` if unusable.

    ``slope`` / ``intercept`` are the metadata CSV's rescale and ``spacing``
    its voxel sizes (D, H, W); None when the CSV has no row for the file.
    """
    volume = load_nifti(path)
    if spacing is None:
        spacing = volume.spacing
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BadVolume("bad_spacing", f"voxel spacing {spacing} mm")
    metadata = None if slope is None or intercept is None else Rescale(float(slope), float(intercept))
    try:
        hu, how = decode_hu(volume.raw, volume.header_rescale, metadata, prep.rescale, prep.hu_window)
    except IntensityError as err:
        raise BadVolume(err.reason, err.detail) from None
    return DecodedVolume(hu, tuple(spacing), how)


def preprocess_file(path: str | Path, prep: Preprocessing, slope: float | None = None,
                    intercept: float | None = None, spacing: tuple[float, float, float] | None = None) -> np.ndarray:
    """Decode and preprocess one NIfTI (see ``decode_file``; metadata spacing wins over the header's).

    Returns float32 (D, H, W) in [-1, 1]; raises ``BadVolume`` for an unusable file.
    """
    decoded = decode_file(path, prep, slope, intercept, spacing)
    return preprocess_array(decoded.hu, decoded.spacing, prep)


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
