"""Bad inputs are skipped with one warning naming the file and the reason, and counted; set-up errors stop early."""

import json
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from core.cli import main
from core.data.cache import cache_path, prepare, summary_path
from core.data.ctrate import SKIP_REASONS
from core.data.dataset import CachedCTDataset
from core.registry import ConfigError
from tests.data_fixtures import data_config, write_nifti


def _train_files(root):
    return sorted((root / "train").rglob("*.nii.gz"))


def _drop_row(path, name):
    frame = pd.read_csv(path)
    frame[frame.VolumeName != name].to_csv(path, index=False)


def _break(root):
    """Damage nine of the ten training inputs, one way each; returns {file: reason}."""
    files = _train_files(root)
    shape = nib.load(files[0]).shape
    expected = {}

    data = files[0].read_bytes()  # truncated .nii.gz
    files[0].write_bytes(data[: len(data) // 2])
    expected[str(files[0])] = "unreadable"
    files[1].write_bytes(b"this is not a NIfTI file at all" * 20)  # corrupt
    expected[str(files[1])] = "unreadable"
    files[2].write_bytes(b"")  # zero bytes
    expected[str(files[2])] = "empty_file"
    write_nifti(files[3], np.zeros(shape[:2], dtype=np.int16))  # 2D
    expected[str(files[3])] = "bad_dims"
    write_nifti(files[4], np.zeros((*shape, 2), dtype=np.int16))  # 4D
    expected[str(files[4])] = "bad_dims"
    volume = np.zeros(shape, dtype=np.float32)
    volume[1, 2, 3] = np.nan
    volume[2, 2, 2] = np.inf
    write_nifti(files[5], volume)  # NaN / inf voxels
    expected[str(files[5])] = "non_finite"
    _drop_row(root / "radiology_text_reports" / "train_reports.csv", files[6].name)  # no report
    expected[str(files[6])] = "no_report"
    _drop_row(root / "multi_abnormality_labels" / "train_predicted_labels.csv", files[7].name)  # no label row
    expected[str(files[7])] = "no_labels"
    files[8].unlink()  # a CSV row whose volume file is missing
    expected[files[8].name] = "missing_file"
    return expected


def test_each_bad_input_is_skipped_with_one_warning_and_counted(dataset_copy, tmp_path, caplog):
    expected = _break(dataset_copy)
    cfg = data_config(dataset_copy, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="core.data.cache"):
        summary = prepare(cfg, splits=("train",), progress=False)
    split = summary.splits["train"]
    assert split.volumes == 1 and summary.skipped_count == 9
    assert split.skipped == {"bad_dims": 2, "empty_file": 1, "missing_file": 1, "no_labels": 1, "no_report": 1,
                             "non_finite": 1, "unreadable": 2}
    assert {f["file"]: f["reason"] for f in split.skipped_files} == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 9
    for file, reason in expected.items():
        if reason == "missing_file":  # summarised in one line per split
            mine = [w for w in warnings if "1 volume(s) listed in the reports CSV have no file" in w]
            assert len(mine) == 1 and file in mine[0] and mine[0].startswith("train:")
            continue
        mine = [w for w in warnings if f"skipping {file}:" in w]
        assert len(mine) == 1, file
        assert reason in mine[0] and SKIP_REASONS[reason] in mine[0]
    on_disk = json.loads(summary_path(cfg, "train").read_text())
    assert on_disk["skipped"] == split.skipped and on_disk["volumes"] == 1
    assert len(CachedCTDataset(cfg, "train")) == 1


def test_bad_files_are_not_retried_but_still_reported(dataset_copy, tmp_path, caplog):
    _break(dataset_copy)
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("train",), progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.data.cache"):
        again = prepare(cfg, splits=("train",), progress=False)
    assert again.processed == 0 and again.skipped_count == 9
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 9


def test_a_repaired_file_is_picked_up(dataset_copy, synthetic_source, tmp_path):
    bad = _train_files(dataset_copy)[2]
    good = bad.read_bytes()
    bad.write_bytes(b"")
    cfg = data_config(dataset_copy, tmp_path / "cache")
    assert prepare(cfg, splits=("train",), progress=False).skipped_count == 1
    bad.write_bytes(good)
    summary = prepare(cfg, splits=("train",), progress=False)
    assert summary.skipped_count == 0 and summary.processed == 1 and summary.splits["train"].volumes == 10


def test_missing_root_fails_before_any_work(tmp_path):
    cfg = data_config(tmp_path / "absent", tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.root .* does not exist"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "cache").exists()


def test_csv_without_required_columns_fails_before_any_work(dataset_copy, tmp_path):
    path = dataset_copy / "radiology_text_reports" / "validation_reports.csv"
    pd.read_csv(path).rename(columns={"Findings_EN": "Findings"}).to_csv(path, index=False)
    cfg = data_config(dataset_copy, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"validation_reports\.csv' lacks the column\(s\) Findings_EN"):
        prepare(cfg, splits=("train", "valid"), progress=False)  # train is fine, but nothing is processed
    assert not cache_path(cfg).exists()


def test_bad_label_values_are_skipped(dataset_copy, tmp_path):
    path = dataset_copy / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    frame = pd.read_csv(path)
    frame.loc[0, "Lung nodule"] = 7
    frame.to_csv(path, index=False)
    summary = prepare(data_config(dataset_copy, tmp_path / "cache"), splits=("valid",), progress=False)
    assert summary.splits["valid"].skipped == {"bad_labels": 1}


def test_a_partial_download_is_summarised_in_one_line_per_split(dataset_copy, tmp_path, caplog, capsys):
    files = _train_files(dataset_copy)
    for path in files[:7]:
        path.unlink()
    (dataset_copy / "valid" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz").unlink()
    cfg = data_config(dataset_copy, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="core.data.cache"):
        summary = prepare(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    first = ", ".join(sorted(p.name for p in files[:7])[:5])
    assert warnings == [
        f"train: 7 volume(s) listed in the reports CSV have no file under the volume folder (a partial download?), "
        f"skipped as missing_file: {first}, ...",
        "valid: 1 volume(s) listed in the reports CSV have no file under the volume folder (a partial download?), "
        "skipped as missing_file: valid_1_a_1.nii.gz",
    ]
    assert summary.splits["train"].skipped == {"missing_file": 7} and summary.splits["train"].volumes == 3
    text = summary.format()
    assert text.count("have no file") == 2 and "skipped train_" not in text
    assert main(["data", "info", "--root", str(dataset_copy), "--cache", str(tmp_path / "cache"),
                 f"data.target_shape={list(cfg.target_shape)}", f"data.target_spacing={list(cfg.target_spacing)}"]) == 0
    info = capsys.readouterr().out
    assert info.count("have no file") == 2 and f"skipped as missing_file: {first}, ..." in info
    assert "skipped train_" not in info
