"""Small synthetic CT-RATE datasets and NIfTI writers shared by the data tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from core.config import DataConfig, load_config
from core.data.synthetic import FOV_MM, synthesize

SHAPE = (16, 32, 32)  # native synthetic size (D, H, W) for tests
SPACING = tuple(f / n for f, n in zip(FOV_MM, SHAPE, strict=True))  # nominal mm, so the volume fits SHAPE


def data_config(root: Path, cache: Path, *overrides: str) -> DataConfig:
    """A DataConfig for a test dataset: 16 × 32 × 32 model input at the synthetic nominal spacing."""
    return load_config(None, [
        f"data.root={root}", f"data.cache_dir={cache}", f"data.target_shape={list(SHAPE)}",
        f"data.target_spacing={list(SPACING)}", *overrides,
    ]).data


WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def affine_for(axcodes: str, zooms=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The NIfTI (RAS+) affine of an array whose axes run towards ``axcodes`` (nibabel's letters, e.g. "LPS")."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, code in enumerate(axcodes):
        row, sign = WORLD_AXIS[code]
        affine[row, axis] = sign * zooms[axis]
    return affine


def write_nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), slope: float | None = 1.0,
                inter: float | None = 0.0, axcodes: str = "LPS") -> Path:
    """Write ``data`` (NIfTI axis order, oriented ``axcodes``, LPS as CT-RATE) with voxel sizes ``zooms`` and
    header scaling ``slope``/``inter`` (None: a blank header, scl_slope = NaN)."""
    affine = affine_for(axcodes, zooms) if data.ndim >= 3 else np.eye(4)
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(np.nan if slope is None else slope, np.nan if inter is None else inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


_SHARED: dict[str, Path] = {}


def shared_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 + 4 volume synthetic CT-RATE at 16 × 32 × 32, written once per test session; do not modify it."""
    if "root" not in _SHARED:
        root = tmp_path_factory.mktemp("synthetic") / "root"
        synthesize(root, train=10, valid=4, seed=3, shape=SHAPE, workers=1, progress=False)
        _SHARED["root"] = root
    return _SHARED["root"]


def copy_dataset(source: Path, folder: Path) -> Path:
    """A private copy of a dataset that a test may modify (file times preserved)."""
    return Path(shutil.copytree(source, folder / "root"))


def reports(root: Path, split: str = "train") -> pd.DataFrame:
    """The split's reports CSV."""
    name = "train_reports.csv" if split == "train" else "validation_reports.csv"
    return pd.read_csv(root / "radiology_text_reports" / name)


def labels(root: Path, split: str = "train") -> pd.DataFrame:
    """The split's labels CSV."""
    name = "train_predicted_labels.csv" if split == "train" else "valid_predicted_labels.csv"
    return pd.read_csv(root / "multi_abnormality_labels" / name)


def metadata(root: Path, split: str = "train") -> pd.DataFrame:
    """The split's metadata CSV."""
    name = "train_metadata.csv" if split == "train" else "validation_metadata.csv"
    return pd.read_csv(root / "metadata" / name)
