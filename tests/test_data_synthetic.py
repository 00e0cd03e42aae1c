"""Synthetic CT-RATE: layout, reports that agree with labels, visible signatures, determinism."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.data.pathologies import PATHOLOGIES
from core.data.phantom import DRAW_ORDER, SIGNATURES, anatomy_primitives, sample_anatomy
from core.data.preprocess import Preprocessing, preprocess_array
from core.data.synthetic import PREVALENCE, Case, plan_volumes, render, sample_case, sample_labels, synthesize
from core.registry import ConfigError
from tests.data_fixtures import SHAPE, labels, metadata, reports


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def _negated(sentence: str) -> bool:
    return re.search(r"\b(no|not)\b", sentence.lower()) is not None


def _check_report(text: str, label_of: dict[str, bool]) -> int:
    """Assert ``text`` states every positive and never asserts a negative; returns how many negatives it negates."""
    negated = 0
    for name in PATHOLOGIES:
        mentions = [s for s in _sentences(text) if name.lower() in s.lower()]
        if label_of[name]:
            assert any(not _negated(s) for s in mentions), (name, text)
        else:
            assert all(_negated(s) for s in mentions), (name, mentions)
            negated += bool(mentions)
    return negated


def test_layout_and_csvs_are_ctrate(synthetic_source):
    root = synthetic_source
    assert (root / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz").is_file()
    assert (root / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz").is_file()
    assert list(reports(root).columns) == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                           "Impressions_EN"]
    assert list(labels(root, "valid").columns) == ["VolumeName", *PATHOLOGIES]
    assert {"VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"} <= set(metadata(root).columns)
    files = sorted((root / "train").rglob("*.nii.gz"))
    assert sorted(f.name for f in files) == sorted(reports(root).VolumeName) == sorted(labels(root).VolumeName)
    meta = metadata(root).set_index("VolumeName")
    for path in files:
        image = nib.load(path)
        row = meta.loc[path.name]
        assert image.get_data_dtype() == np.int16
        assert image.shape == SHAPE[::-1]  # NIfTI (x, y, z) = (W, H, D)
        assert (image.dataobj.slope, image.dataobj.inter) == (row.RescaleSlope, row.RescaleIntercept)
        xy = float(row.XYSpacing.strip("[]").split(",")[0])
        np.testing.assert_allclose(image.header.get_zooms(), (xy, xy, row.ZSpacing), rtol=1e-5)
        hu = np.asarray(image.dataobj)
        assert hu.min() >= -1024 and hu.max() <= 3071 and (hu < -900).mean() > 0.2  # air and lungs present


def test_reports_state_every_positive_and_negate_or_omit_negatives(synthetic_source):
    table = reports(synthetic_source).merge(labels(synthetic_source), on="VolumeName")
    for _, row in table.iterrows():
        _check_report(f"{row.Findings_EN} {row.Impressions_EN}", {p: bool(row[p]) for p in PATHOLOGIES})


def test_many_sampled_reports_agree_with_their_labels_and_fit_128_tokens():
    from transformers import AutoTokenizer

    from core.text import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    negated = []
    for i in range(300):
        case = sample_case(np.random.default_rng([7, i]), 5.0)
        text = f"{case.report['Findings_EN']} {case.report['Impressions_EN']}"
        negated.append(_check_report(text, case.labels))
        assert len(tokenizer(text)["input_ids"]) <= 128, text  # nothing cut off at the default text_max_length
    assert np.mean(np.array(negated) > 0) > 0.85 and np.mean(negated) >= 3  # explicit negations in most reports


def test_label_prevalence_and_co_occurrence():
    rng = np.random.default_rng(0)
    drawn = (sample_labels(rng)[0] for _ in range(4000))
    table = np.array([[row[p] for p in PATHOLOGIES] for row in drawn], dtype=float)
    np.testing.assert_allclose(table.mean(axis=0), [PREVALENCE[p] for p in PATHOLOGIES], atol=0.03)
    index = {p: i for i, p in enumerate(PATHOLOGIES)}
    corr = np.corrcoef(table, rowvar=False)
    assert corr[index["Arterial wall calcification"], index["Coronary artery wall calcification"]] > 0.2
    assert corr[index["Lung opacity"], index["Consolidation"]] > 0.1


def test_small_validation_split_has_both_classes_for_every_label(tmp_path):
    jobs = [job for job in plan_volumes("valid", 40, 0, tmp_path, SHAPE) if job.recon == 1]
    drawn = (sample_labels(job.case_rng())[0] for job in jobs)
    table = np.array([[row[p] for p in PATHOLOGIES] for row in drawn])
    assert table.sum(axis=0).min() >= 2 and (~table).sum(axis=0).min() >= 2


@pytest.mark.parametrize("name", PATHOLOGIES)
def test_each_pathology_is_visible_at_the_tiny_model_input(name):
    """Adding one pathology to the same patient changes the 32 × 64 × 64 model input visibly."""
    shape, spacing = (48, 96, 96), (5.0, 3.0, 3.0)
    prep = Preprocessing((7.5, 4.5, 4.5), (32, 64, 64), (-1000.0, 1000.0))

    def model_input(positive: bool) -> np.ndarray:
        rng = np.random.default_rng(11)
        label_of = {p: positive and p == name for p in PATHOLOGIES}
        anatomy = sample_anatomy(rng, label_of)
        primitives = anatomy_primitives(anatomy, rng)
        for other in DRAW_ORDER:
            if label_of[other]:
                primitives += SIGNATURES[other](rng, anatomy)[0]
        case = Case(label_of, {}, primitives, 60, "F", False)
        return preprocess_array(render(case, shape, spacing, np.random.default_rng(1)), spacing, prep)

    changed = np.abs(model_input(True) - model_input(False)) > 0.05  # 50 HU
    assert changed.sum() >= 12, f"{name}: only {changed.sum()} voxels change"


def _snapshot(root: Path) -> dict[str, object]:
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
    return {k: (np.asarray(nib.load(p).dataobj) if k.endswith(".nii.gz") else p.read_text()) for k, p in files.items()}


def test_generator_is_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    small = (8, 16, 16)
    synthesize(tmp_path / "a", train=4, valid=1, seed=5, shape=small, workers=1, progress=False)
    synthesize(tmp_path / "b", train=4, valid=1, seed=5, shape=small, workers=2, progress=False)
    synthesize(tmp_path / "c", train=4, valid=1, seed=6, shape=small, workers=1, progress=False)
    a, b, c = (_snapshot(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]) if key.endswith(".nii.gz") else a[key] == b[key], key
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith(".nii.gz") and k in c)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty; pass --force"):
        synthesize(tmp_path / "out", train=1, valid=0, shape=(8, 16, 16), progress=False)
    synthesize(tmp_path / "out", train=1, valid=0, shape=(8, 16, 16), progress=False, force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
