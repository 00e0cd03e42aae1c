"""CT-RATE as published: nested NIfTI folders per split plus reports, labels and metadata CSVs.

A root (CT-RATE's ``dataset/`` folder) holds, per split::

    train_fixed/train_1/train_1_a/train_1_a_1.nii.gz    volumes: v2 (the current release); v1 has train/
                                                        (data.volume_dirs; detected when not set)
    radiology_text_reports/train_reports.csv            VolumeName, ClinicalInformation_EN, Technique_EN,
                                                        Findings_EN, Impressions_EN (data.reports_csv)
    multi_abnormality_labels/train_predicted_labels.csv VolumeName + the 18 pathology columns (data.labels_csv)
    metadata/train_metadata.csv                         44 columns incl. RescaleSlope, RescaleIntercept,
                                                        XYSpacing ("[0.75, 0.75]"), ZSpacing (data.metadata_csv)

``read_split`` joins them on VolumeName without decoding any volume. The
candidates are the volume files on disk and the rows of the reports CSV; a
candidate that cannot be used (file missing, no report, no label row) is a
``Skip`` with a reason code, never an exception. A missing root, folder or
CSV, or a CSV without its required columns, is a ``ConfigError`` instead:
those are set-up mistakes, not bad volumes.

Text, as CT-CLIP: training reports are the Findings, validation reports
Findings + Impressions (``data.text_fields``, per split), and a field that
says only "Not given." counts as empty (``data.drop_text``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import DataConfig
from core.data.pathologies import PATHOLOGIES
from core.registry import ConfigError

NIFTI_SUFFIX = ".nii.gz"
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")

# Why a volume was left out; the keys are what summaries count and logs name.
SKIP_REASONS: dict[str, str] = {
    "missing_file": "listed in the reports CSV but the volume file does not exist",
    "no_report": "no row, or an empty report, in the reports CSV",
    "no_labels": "no row in the labels CSV",
    "bad_labels": "the labels row has values other than 0 and 1",
    "empty_file": "the file is empty (0 bytes)",
    "unreadable": "not a readable NIfTI (corrupt or truncated)",
    "bad_dims": "not a 3D volume",
    "non_finite": "NaN or infinite voxel values",
    "bad_spacing": "the voxel spacing is not a positive number",
    "implausible_hu": "its values, read as HU, are not a chest CT (blank, saturated or without air)",
    "no_rescale": "data.rescale is metadata but the metadata CSV has no rescale for it",
}
# Layouts of the volume folders, newest first: CT-RATE v2 (``train_fixed``), v1 (``train``).
LAYOUTS: dict[str, str] = {"v2": "{split}_fixed", "v1": "{split}"}
CTCLIP_TRAIN_SHARE = 80  # percent: CT-CLIP keeps the first int(n × 80 / 100) training samples


@dataclass(frozen=True)
class Skip:
    """A volume left out: which file (or VolumeName), the reason code and the specifics."""

    file: str
    reason: str
    detail: str = ""

    def message(self) -> str:
        """One line naming the file and why it was skipped."""
        extra = f": {self.detail}" if self.detail else ""
        return f"skipping {self.file}: {self.reason} ({SKIP_REASONS[self.reason]}){extra}"


@dataclass(frozen=True)
class VolumeRecord:
    """One usable volume: its file, text, labels and the metadata needed to preprocess it.

    ``slope``, ``intercept`` and ``spacing`` come from the metadata CSV; None
    means "no usable metadata row, read it from the NIfTI header".
    ``spacing`` is in mm in the canonical model order (D, H, W) = (slices, right → left,
    anterior → posterior) = (ZSpacing, XYSpacing[1], XYSpacing[0]): DICOM's PixelSpacing is
    (row spacing, column spacing), i.e. (anterior-posterior, right-left) for an axial scan.
    """

    name: str
    path: Path
    text: str
    labels: tuple[float, ...]
    slope: float | None = None
    intercept: float | None = None
    spacing: tuple[float, float, float] | None = None


@dataclass
class SplitListing:
    """The usable records of one split (sorted by VolumeName) and what was skipped while listing."""

    split: str
    records: list[VolumeRecord]
    skipped: list[Skip]


def volume_name(path: Path) -> str:
    """The VolumeName of a file: its file name, as CT-RATE's CSVs spell it (``train_1_a_1.nii.gz``)."""
    return path.name


def _split_setting(mapping: dict[str, str], split: str, key: str) -> str:
    if split not in mapping:
        raise ConfigError(f"data.{key} has no entry for split '{split}' (splits configured: {', '.join(mapping)})")
    return mapping[split]


def _read_csv(path: Path, required: tuple[str, ...] | list[str], key: str) -> pd.DataFrame:
    """Read a CSV, checking it exists and has ``required`` columns; one row per VolumeName (first kept)."""
    if not path.is_file():
        raise ConfigError(f"{key}: '{path}' does not exist; point data.root at CT-RATE's dataset folder "
                          f"or set {key} to the file's path relative to it")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: '{path}' is not a readable CSV: {err}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConfigError(f"{key}: '{path}' lacks the column(s) {', '.join(missing)} "
                          f"(it has: {', '.join(map(str, frame.columns))})")
    frame["VolumeName"] = frame["VolumeName"].astype(str).str.strip()
    return frame.drop_duplicates("VolumeName").set_index("VolumeName")


def parse_xy_spacing(value: object) -> tuple[float, float] | None:
    """``"[0.75, 0.75]"`` (CT-RATE's XYSpacing) → (0.75, 0.75); None when it holds no two positive numbers."""
    numbers = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(value))]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return numbers[0], numbers[1]


def _finite(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _metadata(row: pd.Series | None) -> tuple[float | None, float | None, tuple[float, float, float] | None]:
    """(slope, intercept, spacing) from a metadata row; missing or malformed parts become None."""
    if row is None:
        return None, None, None
    slope, intercept = _finite(row["RescaleSlope"]), _finite(row["RescaleIntercept"])
    if slope is None or intercept is None or slope == 0:
        slope = intercept = None
    xy, z = parse_xy_spacing(row["XYSpacing"]), _finite(row["ZSpacing"])
    spacing = (z, xy[1], xy[0]) if xy is not None and z is not None and z > 0 else None
    return slope, intercept, spacing


def report_text(row: pd.Series, fields: list[str], drop: tuple[str, ...] | list[str] = ("Not given.",)) -> str:
    """The report text a model sees: the non-empty ``fields`` joined by a space; a field that is only one of
    ``drop`` ("Not given.") counts as empty, as in CT-CLIP's validation loader."""
    parts = []
    for name in fields:
        value = row[name]
        if isinstance(value, str) and value.strip() and value.strip() not in drop:
            parts.append(value.strip())
    return " ".join(parts)


def text_fields(cfg: DataConfig, split: str) -> list[str]:
    """The report columns of ``split``'s text: ``data.text_fields[split]``, or the one list given for all splits."""
    if isinstance(cfg.text_fields, list):
        return list(cfg.text_fields)
    return list(_split_setting(cfg.text_fields, split, "text_fields"))


def volume_dir(cfg: DataConfig, split: str) -> Path:
    """The split's volume folder: ``data.volume_dirs[split]`` when set, else the first of ``<split>_fixed``
    (CT-RATE v2) and ``<split>`` (v1) that exists; ConfigError naming what was looked for."""
    root = Path(cfg.root)
    if split in cfg.volume_dirs:
        folder = root / cfg.volume_dirs[split]
        if not folder.is_dir():
            raise ConfigError(f"data.volume_dirs.{split}: folder '{folder}' does not exist")
        return folder
    candidates = {layout: root / pattern.format(split=split) for layout, pattern in LAYOUTS.items()}
    for folder in candidates.values():
        if folder.is_dir():
            return folder
    looked = " nor ".join(f"'{folder}' (CT-RATE {layout})" for layout, folder in candidates.items())
    raise ConfigError(f"split '{split}': neither {looked} exists under data.root; point data.root at CT-RATE's "
                      f"dataset folder or set data.volume_dirs.{split} to the folder holding its volumes")


def _labels(row: pd.Series) -> tuple[float, ...] | None:
    values = pd.to_numeric(row[list(PATHOLOGIES)], errors="coerce").to_numpy(dtype=float)
    if not np.isin(values, (0.0, 1.0)).all():
        return None
    return tuple(float(v) for v in values)


def check_root(cfg: DataConfig, split: str) -> dict[str, Path]:
    """Resolve and check the split's folder and CSV paths; ConfigError naming the first one missing."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root '{root}' does not exist; create a synthetic CT-RATE with "
                          f"`ctlab data synth --out {root}` or point data.root at CT-RATE's dataset folder")
    paths = {
        "reports": root / _split_setting(cfg.reports_csv, split, "reports_csv"),
        "labels": root / _split_setting(cfg.labels_csv, split, "labels_csv"),
        "metadata": root / _split_setting(cfg.metadata_csv, split, "metadata_csv"),
    }
    paths["volumes"] = volume_dir(cfg, split)
    for key in ("reports", "labels", "metadata"):
        if not paths[key].is_file():
            raise ConfigError(f"data.{key}_csv.{split}: '{paths[key]}' does not exist")
    return paths


def ctclip_first80(names: list[str]) -> list[str]:
    """CT-CLIP's training list: the first ``int(n × 80 / 100)`` of ``names`` in listing order (sorted here;
    CT-CLIP's own order is its file system's glob order)."""
    return names[: int(len(names) * CTCLIP_TRAIN_SHARE / 100)]


def _subset(names: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random ``fraction`` of ``names`` (at least one), returned in sorted order."""
    if fraction >= 1.0 or not names:
        return names
    count = max(1, round(fraction * len(names)))
    chosen = np.random.default_rng(seed).choice(len(names), size=count, replace=False)
    return sorted(names[i] for i in chosen)


def read_split(cfg: DataConfig, split: str) -> SplitListing:
    """Join one split's volume files and CSVs on VolumeName (no volume is decoded).

    Candidates = volume files found under the split folder ∪ rows of the
    reports CSV, sorted. ``data.subset: ctclip_first80`` keeps, for train,
    the first 80 % of the files that have a report (CT-CLIP's list);
    ``data.subset_fraction`` then keeps a seeded random part. Each candidate
    becomes a ``VolumeRecord`` or a ``Skip``.
    """
    paths = check_root(cfg, split)
    fields = text_fields(cfg, split)
    reports = _read_csv(paths["reports"], ["VolumeName", *fields], f"data.reports_csv.{split}")
    labels = _read_csv(paths["labels"], ["VolumeName", *PATHOLOGIES], f"data.labels_csv.{split}")
    metadata = _read_csv(paths["metadata"], METADATA_COLUMNS, f"data.metadata_csv.{split}")

    files = {volume_name(p): p for p in sorted(paths["volumes"].rglob(f"*{NIFTI_SUFFIX}")) if p.is_file()}
    names = sorted(set(files) | set(reports.index))
    if cfg.subset == "ctclip_first80" and split == "train":
        names = ctclip_first80([name for name in names if name in files and name in reports.index])
    names = _subset(names, cfg.subset_fraction, cfg.subset_seed)

    records, skipped = [], []
    for name in names:
        path = files.get(name)
        if path is None:
            skipped.append(Skip(name, "missing_file", f"no {name} under {paths['volumes']}"))
            continue
        text = report_text(reports.loc[name], fields, cfg.drop_text) if name in reports.index else ""
        if not text:
            skipped.append(Skip(str(path), "no_report", f"in {paths['reports']}"))
            continue
        if name not in labels.index:
            skipped.append(Skip(str(path), "no_labels", f"in {paths['labels']}"))
            continue
        label_values = _labels(labels.loc[name])
        if label_values is None:
            skipped.append(Skip(str(path), "bad_labels", f"in {paths['labels']}"))
            continue
        slope, intercept, spacing = _metadata(metadata.loc[name] if name in metadata.index else None)
        records.append(VolumeRecord(name, path, text, label_values, slope, intercept, spacing))
    return SplitListing(split, records, skipped)
