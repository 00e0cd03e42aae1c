"""Synthetic CT-RATE: seeded chest phantoms whose 18 labels leave visible signatures, in CT-RATE's layout.

``synthesize(out, train=N, valid=M)`` writes exactly what ``core.data.ctrate``
reads from the real dataset: nested ``train/train_1/train_1_a/train_1_a_1.nii.gz``
folders, the reports, labels and metadata CSVs with CT-RATE's column names,
int16 NIfTI volumes with RescaleSlope/RescaleIntercept in the header
(``scl_slope``/``scl_inter``) and in the metadata CSV, and a scanner-like
affine. Some scans have a second reconstruction (``_a_2``) sharing the report.

Labels are drawn with CT-RATE-like prevalences (floored at 12 % so small
validation sets have positives) and co-occurrence through four latent
factors (age, cardiac, infection, airway). Each scan is a chest phantom
(``core.data.phantom``) in which every positive label leaves its own visible
signature: nodules, effusion fluid, an enlarged heart, calcified plaques, …
The report (``core.data.reports``) states each positive by name with the
details the phantom drew. Everything is a function of (seed, split, index),
so the output does not depend on the number of workers.

Axes: volumes are built (D, H, W) = (z inferior→superior, y anterior→posterior,
x patient right→left) and stored as CT-RATE stores its volumes: NIfTI array
(x, y, z), LPS (``nibabel.aff2axcodes`` gives ``('L', 'P', 'S')``), with the
truthful affine diag(−sx, −sy, +sz) in RAS+ world coordinates (index i grows
towards the patient's left, i.e. towards −x_RAS) centred on the origin.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.stats import norm
from tqdm.auto import tqdm

from core.data.pathologies import PATHOLOGIES
from core.data.phantom import DRAW_ORDER, SIGNATURES, Canvas, Primitive, anatomy_primitives, sample_anatomy
from core.data.reports import write_report
from core.registry import ConfigError

DEFAULT_SHAPE = (48, 96, 96)  # (D, H, W) voxels
FOV_MM = (240.0, 288.0, 288.0)  # (D, H, W) field of view at nominal spacing; spacing = FOV / shape
SPLIT_IDS = {"train": 0, "valid": 1}
SECOND_RECON_P = 0.15

# CT-RATE-like prevalence (floored at 0.12) and (latent factor, loading) per label.
PREVALENCE: dict[str, float] = {
    "Medical material": 0.12, "Arterial wall calcification": 0.28, "Cardiomegaly": 0.12,
    "Pericardial effusion": 0.12, "Coronary artery wall calcification": 0.26, "Hiatal hernia": 0.14,
    "Lymphadenopathy": 0.26, "Emphysema": 0.20, "Atelectasis": 0.26, "Lung nodule": 0.45, "Lung opacity": 0.38,
    "Pulmonary fibrotic sequela": 0.27, "Pleural effusion": 0.12, "Mosaic attenuation pattern": 0.12,
    "Peribronchial thickening": 0.12, "Consolidation": 0.17, "Bronchiectasis": 0.12,
    "Interlobular septal thickening": 0.12,
}
FACTORS: dict[str, tuple[str, float]] = {
    "Medical material": ("age", 0.3), "Arterial wall calcification": ("age", 0.7), "Cardiomegaly": ("cardiac", 0.6),
    "Pericardial effusion": ("cardiac", 0.5), "Coronary artery wall calcification": ("age", 0.7),
    "Hiatal hernia": ("age", 0.3), "Lymphadenopathy": ("infection", 0.3), "Emphysema": ("age", 0.4),
    "Atelectasis": ("infection", 0.4), "Lung nodule": ("age", 0.3), "Lung opacity": ("infection", 0.6),
    "Pulmonary fibrotic sequela": ("age", 0.4), "Pleural effusion": ("cardiac", 0.5),
    "Mosaic attenuation pattern": ("airway", 0.4), "Peribronchial thickening": ("airway", 0.5),
    "Consolidation": ("infection", 0.6), "Bronchiectasis": ("airway", 0.5),
    "Interlobular septal thickening": ("cardiac", 0.5),
}
LATENTS = ("age", "cardiac", "infection", "airway")
THRESHOLDS = {name: float(norm.ppf(1 - p)) for name, p in PREVALENCE.items()}  # on a standard normal score


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One synthetic scan: labels, report, the primitives to draw, and patient metadata."""

    labels: dict[str, bool]
    report: dict[str, str]
    primitives: list[Primitive]
    age: int
    sex: str
    contrast: bool
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def sample_labels(rng: np.random.Generator) -> tuple[dict[str, bool], dict[str, float]]:
    """Labels with PREVALENCE marginals, correlated through the latent factors; also returns the factors."""
    latent = {name: float(rng.standard_normal()) for name in LATENTS}
    labels = {}
    for name in PATHOLOGIES:
        factor, loading = FACTORS[name]
        z = loading * latent[factor] + math.sqrt(1 - loading**2) * rng.standard_normal()
        labels[name] = bool(z > THRESHOLDS[name])
    return labels, latent


def sample_case(rng: np.random.Generator, slice_mm: float) -> Case:
    """Draw one scan's labels, anatomy, signatures and report."""
    labels, latent = sample_labels(rng)
    anatomy = sample_anatomy(rng, labels)
    primitives = anatomy_primitives(anatomy, rng)
    details: dict[str, dict[str, Any]] = {}
    if labels["Cardiomegaly"]:
        details["Cardiomegaly"] = {"ratio": f"0.{int(rng.integers(56, 66))}"}
    for name in DRAW_ORDER:
        if labels[name]:
            prims, details[name] = SIGNATURES[name](rng, anatomy)
            primitives += prims
    contrast = anatomy.blood_hu > 100
    technique = (f"{'Contrast-enhanced' if contrast else 'Non-contrast'} thorax CT. Axial images were obtained "
                 f"with {slice_mm:g} mm slice thickness.")
    report = write_report(labels, details, rng, technique)
    age = int(np.clip(round(58 + 14 * latent["age"]), 18, 92))
    return Case(labels, report, primitives, age, str(rng.choice(["M", "F"])), contrast, details)


def render(case: Case, shape: tuple[int, int, int], spacing: tuple[float, float, float],
           rng: np.random.Generator) -> np.ndarray:
    """The case's HU volume (D, H, W) on a grid of ``shape`` × ``spacing`` mm, with scanner noise."""
    canvas = Canvas(shape, spacing)
    for primitive in case.primitives:
        primitive.draw(canvas)
    noise = float(rng.uniform(8.0, 20.0))
    hu = canvas.hu + rng.normal(0.0, noise, shape).astype(np.float32)
    return np.clip(hu, -1024.0, 3071.0)


# --------------------------------------------------------------------------- writing CT-RATE


@dataclass(frozen=True)
class _VolumeJob:
    split: str
    scan: int
    recon: int
    path: str
    seed: int
    shape: tuple[int, int, int]
    draw: int  # which label draw of the split was accepted (see split_draw)

    def case_rng(self) -> np.random.Generator:
        """The generator of this scan's case (shared by its reconstructions)."""
        return case_rng(self.seed, self.split, self.draw, self.scan)


def case_rng(seed: int, split: str, draw: int, scan: int) -> np.random.Generator:
    """The seeded generator of one scan: labels are its first draws, then anatomy, signatures, report."""
    return np.random.default_rng([seed, SPLIT_IDS.get(split, 2), draw, scan])


def split_draw(seed: int, split: str, scans: int, min_count: int = 2, tries: int = 200) -> int:
    """The first label draw in which every label has ≥ ``min_count`` positive and negative scans.

    Keeps small validation splits evaluable (an AUROC needs both classes).
    Splits with fewer than 10 × ``min_count`` scans take draw 0 as it is.
    """
    if scans < 10 * min_count:
        return 0
    for draw in range(tries):
        drawn = (sample_labels(case_rng(seed, split, draw, scan))[0] for scan in range(1, scans + 1))
        table = np.array([[labels[p] for p in PATHOLOGIES] for labels in drawn])
        positives = table.sum(axis=0)
        if positives.min() >= min_count and (scans - positives).min() >= min_count:
            return draw
    return 0


COLUMNS = {
    "report": ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
    "labels": ["VolumeName", *PATHOLOGIES],
    "volume": ["VolumeName", "Manufacturer", "ManufacturerModelName", "PatientSex", "PatientAge", "Rows", "Columns",
               "NumberofSlices", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
               "ContrastBolusAgent", "ImageOrientationPatient"],
}
RESCALES = ((1.0, -1024.0), (1.0, -1024.0), (1.0, -1000.0), (0.5, -1024.0))


def _write_volume(job: _VolumeJob) -> dict[str, Any]:
    """Sample, render and write one volume; returns its metadata row."""
    nominal = tuple(f / n for f, n in zip(FOV_MM, job.shape, strict=True))
    case = sample_case(job.case_rng(), nominal[0])
    rng = np.random.default_rng([job.seed, SPLIT_IDS.get(job.split, 2), job.draw, job.scan, job.recon])
    xy = nominal[1] * float(rng.uniform(0.94, 1.06))
    spacing = (nominal[0] * float(rng.choice([0.9, 1.0, 1.1])), xy, xy)
    hu = render(case, job.shape, spacing, rng)
    slope, intercept = RESCALES[int(rng.integers(len(RESCALES)))]
    raw = np.round((hu - intercept) / slope).astype(np.int16).transpose(2, 1, 0)  # (D, H, W) → NIfTI (x, y, z)
    d, h, w = job.shape
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])  # LPS: i → left, j → posterior, k → superior
    affine[:3, 3] = [(w - 1) / 2 * spacing[2], (h - 1) / 2 * spacing[1], -(d - 1) / 2 * spacing[0]]
    image = nib.Nifti1Image(raw, affine)
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(slope, intercept)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, job.path)
    name = Path(job.path).name
    return {
        "volume": {
            "VolumeName": name, "Manufacturer": "SYNTHETIC", "ManufacturerModelName": "Phantom CT",
            "PatientSex": case.sex, "PatientAge": f"{case.age:03d}Y", "Rows": h, "Columns": w,
            "NumberofSlices": d, "XYSpacing": f"[{spacing[1]:.6g}, {spacing[2]:.6g}]", "ZSpacing": f"{spacing[0]:.6g}",
            "RescaleIntercept": intercept, "RescaleSlope": slope, "RescaleType": "HU",
            "ContrastBolusAgent": "Contrast" if case.contrast else "",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        },
        "report": {"VolumeName": name, **case.report},
        "labels": {"VolumeName": name, **{p: int(case.labels[p]) for p in PATHOLOGIES}},
    }


def plan_volumes(split: str, count: int, seed: int, out: Path, shape: tuple[int, int, int]) -> list[_VolumeJob]:
    """``count`` volumes of ``split``: scans ``<split>_<i>_a`` with 1 or (15 %) 2 reconstructions."""
    recons, total = [], 0
    while total < count:
        extra = np.random.default_rng([seed, SPLIT_IDS.get(split, 2), len(recons) + 1, 99]).random() < SECOND_RECON_P
        recons.append(min(2 if extra else 1, count - total))
        total += recons[-1]
    draw = split_draw(seed, split, len(recons))
    jobs = []
    for scan, n in enumerate(recons, start=1):
        for recon in range(1, n + 1):
            folder = out / split / f"{split}_{scan}" / f"{split}_{scan}_a"
            jobs.append(_VolumeJob(split, scan, recon, str(folder / f"{split}_{scan}_a_{recon}.nii.gz"), seed, shape,
                                   draw))
    return jobs


@dataclass
class SynthSummary:
    """What ``synthesize`` wrote."""

    root: str
    volumes: dict[str, int]
    positives: dict[str, dict[str, int]]  # split → pathology → count
    seconds: float


def synthesize(out: str | Path, train: int = 160, valid: int = 40, seed: int = 0,
               shape: tuple[int, int, int] = DEFAULT_SHAPE, workers: int = 1, progress: bool = True,
               force: bool = False) -> SynthSummary:
    """Write a synthetic CT-RATE with ``train`` + ``valid`` volumes under ``out`` (see the module docstring).

    Refuses to write into a non-empty folder unless ``force`` (which replaces it).
    Deterministic for ``seed`` and ``shape``, whatever ``workers`` is.
    """
    start = time.perf_counter()
    out = Path(out)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"synthetic shape {list(shape)}: needs 3 sizes (D, H, W) of at least 8 voxels")
    if train < 1 or valid < 0:
        raise ConfigError(f"synthetic sizes train={train}, valid={valid}: need train >= 1 and valid >= 0")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"'{out}' already exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    counts = {"train": train, "valid": valid}
    jobs = [job for split, n in counts.items() for job in plan_volumes(split, n, seed, out, tuple(shape))]
    rows = _run_jobs(jobs, workers, progress)
    files = {"train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
             "valid": ("validation_reports.csv", "valid_predicted_labels.csv", "validation_metadata.csv")}
    positives = {}
    for split, (reports, labels, metadata) in files.items():
        split_rows = [row for job, row in zip(jobs, rows, strict=True) if job.split == split]
        frames = {kind: pd.DataFrame([r[kind] for r in split_rows], columns=COLUMNS[kind]) for kind in COLUMNS}
        for kind, folder, name in (("report", "radiology_text_reports", reports),
                                   ("labels", "multi_abnormality_labels", labels), ("volume", "metadata", metadata)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            frames[kind].to_csv(out / folder / name, index=False)
        (out / split).mkdir(exist_ok=True)
        positives[split] = {p: int(frames["labels"][p].sum()) if split_rows else 0 for p in PATHOLOGIES}
    return SynthSummary(str(out), counts, positives, time.perf_counter() - start)


def _run_jobs(jobs: list[_VolumeJob], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = tqdm(total=len(jobs), desc="synth", unit="vol", disable=not progress)
    if workers <= 1:
        rows = []
        for job in jobs:
            rows.append(_write_volume(job))
            bar.update()
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["core.data.synthetic"])
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rows = []
            for row in pool.map(_write_volume, jobs, chunksize=4):
                rows.append(row)
                bar.update()
    bar.close()
    return rows
