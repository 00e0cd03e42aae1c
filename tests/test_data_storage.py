"""CT-RATE as users download it: v1 / v2 layouts, every way a volume's intensities and orientation are stored,
and the real 44-column metadata CSV. Real NIfTI files, written here; ``prepare`` with default settings."""

import csv
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from core.data.cache import prepare
from core.data.ctrate import read_split
from core.data.dataset import CachedCTDataset
from core.data.pathologies import PATHOLOGIES
from core.registry import ConfigError
from tests.data_fixtures import data_config, write_nifti

# The header and first row of CT-RATE's dataset/metadata/validation_metadata.csv, exactly as published
# (44 columns; XYSpacing a bracketed string; Philips rows have intercept −1024).
METADATA_HEADER = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,ReconstructionDiameter,"
    "DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,RotationDirection,ExposureTime,"
    "XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,"
    "SingleCollimationWidth,TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,"
    "DataCollectionCenterPatient,ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,"
    "ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,PhotometricInterpretation,Rows,"
    "Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,ZSpacing,StudyDate"
)
PHILIPS_ROW = (
    'valid_1_a_1.nii.gz,Philips,HRCT,iCT 256,M,036Y,350,,,0,71,CW,622,186,116,YA,,,YA,HFS,,,,,,,,,Z DOM,'
    '7.830488795,"[-166, 9, 56.2998657]","[1, 0, 0, 0, 1, 0]",56.3,1,MONOCHROME2,1024,1024,'
    '"[0.341796875, 0.341796875]",-1024,1,,251,1.5,20210427'
)
# A Siemens Healthineers row in the same format: 28 % of the validation rows have intercept −8192.
SIEMENS_ROW = (
    'valid_2_a_1.nii.gz,SIEMENS,Thorax 1.0 Br60,SOMATOM go.Now,F,061Y,380,940,535,0,158,CW,600,117,48,FLAT,,0.7,'
    'Br60d,HFS,0.6,0.6,19.2,38.4,23.04,1.2,"[0, -158, 0]","[-1.5, -174, -410]",DOM,4.21,'
    '"[-191.5, -349, -411]","[1, 0, 0, 0, 1, 0]",-411,1,MONOCHROME2,512,512,"[0.748046875, 0.748046875]",-8192,1,'
    'HU,302,1,20200917'
)

# The test phantom, stored LPS as CT-RATE (i: patient right → left, j: anterior → posterior, k: inferior →
# superior) at 1 × 1 × 2 mm: air −1000 HU, a body of 40 HU, two lungs of −850 HU, a 700 HU marker.
LPS_SHAPE = (20, 16, 10)
ZOOMS = (1.0, 1.0, 2.0)
MARKER_LPS = (16, 3, 7)  # patient left, anterior, superior
MARKER_DHW = (7, 16, 3)  # canonical (D, H, W) = (k, i, j), as CT-CLIP's permute(2, 0, 1)
BODY_DHW = (5, 10, 12)  # a body voxel outside the lungs


def phantom_hu() -> np.ndarray:
    """The phantom's HU in LPS array order."""
    hu = np.full(LPS_SHAPE, -1000.0, dtype=np.float32)
    hu[2:18, 2:14, :] = 40.0
    hu[4:9, 4:11, 2:9] = -850.0
    hu[12:16, 4:11, 2:9] = -850.0
    hu[MARKER_LPS] = 700.0
    return hu


def padded(hu: np.ndarray, value: float) -> np.ndarray:
    """``hu`` with the air outside the in-plane reconstruction circle set to a scanner's padding ``value``."""
    i, j = np.meshgrid(np.arange(LPS_SHAPE[0]), np.arange(LPS_SHAPE[1]), indexing="ij")
    outside = ((i - 9.5) / 10) ** 2 + ((j - 7.5) / 8) ** 2 > 1
    out = hu.copy()
    out[outside[..., None] & (hu == -1000)] = value
    return out


def _variants() -> dict[str, dict]:
    """Storage variant → how it is written: stored array, header scaling, CSV rescale, orientation."""
    hu = phantom_hu()
    as_int16 = hu.astype(np.int16)
    return {
        "v2 HU int16, header 1/0, CSV −1024": dict(data=as_int16, header=(1.0, 0.0), csv=(1, -1024)),
        "v2 HU int16, header 1/0, CSV −8192": dict(data=as_int16, header=(1.0, 0.0), csv=(1, -8192)),
        "raw int16, rescale in header": dict(data=(hu + 1024).astype(np.int16), header=(1.0, -1024.0),
                                             csv=(1, -1024)),
        "v1 float raw, blank header, CSV −1024": dict(data=(hu + 1024).astype(np.float32), header=(None, None),
                                                      csv=(1, -1024)),
        "v1 int16 raw, blank header, CSV −8192": dict(data=(hu + 8192).astype(np.int16), header=(None, None),
                                                      csv=(1, -8192)),
        "v1 int16 raw, −2000 HU padding, CSV −1024": dict(data=(padded(hu, -2000) + 1024).astype(np.int16),
                                                          header=(None, None), csv=(1, -1024)),
        "v2 HU int16, −3024 HU padding, CSV −1024": dict(data=padded(hu, -3024).astype(np.int16),
                                                         header=(1.0, 0.0), csv=(1, -1024)),
        "stored RAS (HU int16)": dict(data=np.ascontiguousarray(as_int16[::-1, ::-1, :]), header=(1.0, 0.0),
                                      csv=(1, -1024), axcodes="RAS"),
        "stored slices first, SPR (HU int16)": dict(data=np.ascontiguousarray(as_int16[::-1, :, :].transpose(2, 1, 0)),
                                                    header=(1.0, 0.0), csv=(1, -1024), axcodes="SPR"),
    }


EXPECTED_READING = {
    "v2 HU int16, header 1/0, CSV −1024": "none", "v2 HU int16, header 1/0, CSV −8192": "none",
    "raw int16, rescale in header": "header", "v1 float raw, blank header, CSV −1024": "metadata",
    "v1 int16 raw, blank header, CSV −8192": "metadata", "stored RAS (HU int16)": "none",
    "v1 int16 raw, −2000 HU padding, CSV −1024": "metadata", "v2 HU int16, −3024 HU padding, CSV −1024": "none",
    "stored slices first, SPR (HU int16)": "none",
}


def _metadata_row(name: str, slope: float, intercept: float, xy: float, z: float) -> str:
    """A row in CT-RATE's exact 44-column format (the Philips row with this volume's values)."""
    fields = next(csv.reader(io.StringIO(PHILIPS_ROW)))
    columns = METADATA_HEADER.split(",")
    fields[columns.index("VolumeName")] = name
    fields[columns.index("RescaleSlope")] = f"{slope:g}"
    fields[columns.index("RescaleIntercept")] = f"{intercept:g}"
    fields[columns.index("XYSpacing")] = f"[{xy}, {xy}]"
    fields[columns.index("ZSpacing")] = f"{z:g}"
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def write_tree(root: Path, volumes: dict[str, dict[str, dict]], folders: dict[str, str]) -> dict[str, str]:
    """A CT-RATE tree: split → {variant: spec} written as NIfTI under ``folders[split]``, with its CSVs.

    Returns VolumeName → variant.
    """
    names = {}
    csv_names = {"train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
                 "valid": ("validation_reports.csv", "valid_predicted_labels.csv", "validation_metadata.csv")}
    for split, specs in volumes.items():
        reports, labels, metadata = [], [], [METADATA_HEADER]
        for n, (variant, spec) in enumerate(specs.items(), start=1):
            name = f"{split}_{n}_a_1.nii.gz"
            names[name] = variant
            path = root / folders[split] / f"{split}_{n}" / f"{split}_{n}_a" / name
            codes = spec.get("axcodes", "LPS")
            zooms = tuple(ZOOMS["LPS".index({"R": "L", "A": "P", "I": "S"}.get(c, c))] for c in codes)
            write_nifti(path, spec["data"], zooms=zooms, slope=spec["header"][0], inter=spec["header"][1],
                        axcodes=codes)
            reports.append({"VolumeName": name, "ClinicalInformation_EN": "Not given.", "Technique_EN": "CT.",
                            "Findings_EN": f"Findings of {variant}.", "Impressions_EN": "Not given."})
            labels.append({"VolumeName": name, **{p: n % 2 for p in PATHOLOGIES}})
            metadata.append(_metadata_row(name, *spec["csv"], xy=ZOOMS[0], z=ZOOMS[2]))
        report_csv, label_csv, meta_csv = csv_names[split]
        (root / "radiology_text_reports").mkdir(parents=True, exist_ok=True)
        (root / "multi_abnormality_labels").mkdir(exist_ok=True)
        (root / "metadata").mkdir(exist_ok=True)
        pd.DataFrame(reports).to_csv(root / "radiology_text_reports" / report_csv, index=False)
        pd.DataFrame(labels).to_csv(root / "multi_abnormality_labels" / label_csv, index=False)
        (root / "metadata" / meta_csv).write_text("\n".join(metadata) + "\n")
    return names


def _config(root: Path, cache: Path, *overrides: str):
    dhw = (LPS_SHAPE[2], LPS_SHAPE[0], LPS_SHAPE[1])
    spacing = (ZOOMS[2], ZOOMS[0], ZOOMS[1])
    return data_config(root, cache, f"data.target_shape={list(dhw)}", f"data.target_spacing={list(spacing)}",
                       *overrides)


def prepared_variants(tmp_path: Path, caplog) -> tuple[dict, dict, object]:
    """Every variant plus an all-constant volume in a v2 tree, prepared with default settings."""
    variants = _variants()
    blank = {"all-constant int16": dict(data=np.zeros(LPS_SHAPE, np.int16), header=(1.0, 0.0), csv=(1, -1024))}
    names = write_tree(tmp_path / "root", {"train": dict(list(variants.items())[:2]), "valid": {**variants, **blank}},
                       {"train": "train_fixed", "valid": "valid_fixed"})
    cfg = _config(tmp_path / "root", tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="core.data.cache"):
        summary = prepare(cfg, progress=False)
    dataset = CachedCTDataset(cfg, "valid")
    by_variant = {names[name]: dataset[i]["volume"][0].numpy() for i, name in enumerate(dataset.names)}
    return by_variant, names, summary


def test_every_storage_variant_gives_the_same_model_input(tmp_path, caplog):
    by_variant, names, summary = prepared_variants(tmp_path, caplog)
    assert set(by_variant) == set(_variants())
    reference = by_variant["v2 HU int16, header 1/0, CSV −1024"]
    for variant, volume in by_variant.items():
        assert volume[BODY_DHW] == pytest.approx(0.04, abs=0.01), variant  # 40 HU in the [−1000, 1000] window
        marker = np.unravel_index(np.argmax(volume), volume.shape)
        assert np.abs(np.subtract(marker, MARKER_DHW)).max() <= 1, (variant, marker)
        assert volume[MARKER_DHW] == pytest.approx(0.7, abs=0.01), variant
        np.testing.assert_allclose(volume, reference, atol=2e-3, err_msg=variant)
    assert summary.splits["valid"].rescale == {"header": 1, "metadata": 3, "none": 5}
    assert summary.splits["train"].rescale == {"none": 2}
    logged = [r.getMessage() for r in caplog.records if "HU read" in r.getMessage()]
    assert any(m.startswith("valid: HU read: 1 by the NIfTI header") and "3 by the metadata CSV" in m
               and "5 stored values already in HU" in m for m in logged), logged


def test_each_variant_takes_the_expected_reading(tmp_path, caplog):
    _, names, _ = prepared_variants(tmp_path, caplog)
    cfg = _config(tmp_path / "root", tmp_path / "cache")
    index = CachedCTDataset(cfg, "valid").entries
    assert {names[e["name"]]: e["rescale"] for e in index} == EXPECTED_READING


def test_an_all_constant_volume_is_skipped_and_named_while_the_rest_are_prepared(tmp_path, caplog):
    _, names, summary = prepared_variants(tmp_path, caplog)
    split = summary.splits["valid"]
    assert split.volumes == len(_variants()) and split.skipped == {"implausible_hu": 1}
    (skipped,) = split.skipped_files
    assert names[Path(skipped["file"]).name] == "all-constant int16"
    assert "every voxel holds -1024 HU" in skipped["detail"]  # read as raw + the CSV rescale, then found blank
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipping {skipped['file']}: implausible_hu (its values, read as HU, are not a chest CT "
                        f"(blank, saturated or without air)): {skipped['detail']}"]


def test_csv_rescale_applied_twice_is_caught_not_cached(tmp_path):
    """Forcing CT-CLIP's reading (the CSV rescale on top) on a v2 HU file with intercept −8192 makes every voxel
    < −1000: the volume is skipped as implausible rather than cached blank."""
    write_tree(tmp_path / "root", {"valid": {"hu": _variants()["v2 HU int16, header 1/0, CSV −8192"]}},
               {"valid": "valid_fixed"})
    cfg = _config(tmp_path / "root", tmp_path / "cache", "data.rescale=metadata")
    split = prepare(cfg, splits=("valid",), progress=False).splits["valid"]
    assert split.volumes == 0 and split.skipped == {"implausible_hu": 1}
    assert "floor or ceiling" in split.skipped_files[0]["detail"] and "data.rescale" in split.skipped_files[0]["detail"]


def test_v1_layout_is_detected_and_explicit_volume_dirs_win(tmp_path):
    variants = _variants()
    one = {"a": variants["v1 float raw, blank header, CSV −1024"]}
    write_tree(tmp_path / "root", {"train": one, "valid": one}, {"train": "train", "valid": "valid"})
    records = read_split(_config(tmp_path / "root", tmp_path / "cache"), "train").records
    assert [r.path.parent.parent.parent.name for r in records] == ["train"]
    # a v2 folder beside it is preferred, unless data.volume_dirs names the folder
    write_tree(tmp_path / "root", {"train": one}, {"train": "train_fixed"})
    assert read_split(_config(tmp_path / "root", tmp_path / "cache"), "train").records[0].path.parts[-4] == \
        "train_fixed"
    explicit = _config(tmp_path / "root", tmp_path / "cache", "data.volume_dirs={train: train}")
    assert read_split(explicit, "train").records[0].path.parts[-4] == "train"


def test_a_tree_with_neither_layout_names_both(tmp_path):
    write_tree(tmp_path / "root", {"valid": {"a": _variants()["stored RAS (HU int16)"]}}, {"valid": "volumes"})
    cfg = _config(tmp_path / "root", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"neither '.*valid_fixed' \(CT-RATE v2\) nor '.*root/valid' \(CT-RATE v1\)"
                                          r".*data\.volume_dirs\.valid"):
        prepare(cfg, splits=("valid",), progress=False)
    explicit = _config(tmp_path / "root", tmp_path / "cache", "data.volume_dirs={valid: volumes}")
    assert prepare(explicit, splits=("valid",), progress=False).splits["valid"].volumes == 1


def test_real_validation_metadata_format_parses(tmp_path):
    root = tmp_path / "root"
    spec = _variants()["v2 HU int16, header 1/0, CSV −1024"]
    write_tree(root, {"valid": {"philips": spec, "siemens": spec}}, {"valid": "valid_fixed"})
    path = root / "metadata" / "validation_metadata.csv"
    path.write_text("\n".join([METADATA_HEADER, PHILIPS_ROW, SIEMENS_ROW]) + "\n")
    frame = pd.read_csv(path)
    assert frame.shape == (2, 44)
    records = {r.name: r for r in read_split(_config(root, tmp_path / "cache"), "valid").records}
    philips, siemens = records["valid_1_a_1.nii.gz"], records["valid_2_a_1.nii.gz"]
    assert (philips.slope, philips.intercept) == (1.0, -1024.0)
    assert (siemens.slope, siemens.intercept) == (1.0, -8192.0)
    assert philips.spacing == (1.5, 0.341796875, 0.341796875)
    assert siemens.spacing == (1.0, 0.748046875, 0.748046875)


def test_synthetic_writer_affine_tells_the_truth_about_the_heart_side(synthetic_source):
    """The phantom's heart lies left of the midline: read through each file's own affine, 55 mm to the
    patient's left is heart (soft tissue / blood) and 55 mm to the right is lung (unless a pathology fills it)."""
    left, right = [], []
    for path in sorted(synthetic_source.rglob("*.nii.gz")):
        image = nib.load(path)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        hu, to_voxel = np.asarray(image.dataobj), np.linalg.inv(image.affine)
        for x_ras, values in ((-55.0, left), (55.0, right)):  # RAS world: −x is the patient's left
            i, j, k = np.round(to_voxel @ [x_ras, 30.0, -40.0, 1.0])[:3].astype(int)  # 30 mm anterior, 40 inferior
            values.append(float(hu[i - 1:i + 2, j - 1:j + 2, k].mean()))
        assert left[-1] > right[-1], (path.name, left[-1], right[-1])
    assert len(left) == 14 and np.median(left) > -100 and np.median(right) < -700
