"""synth → read → prepare → Dataset round trip, and the cache's keying, no-op and resume behaviour."""

import os
import time

import numpy as np
import pytest
import torch

from core.data.cache import cache_path, data_fingerprint, index_path, prepare
from core.data.ctrate import read_split
from core.data.dataset import CachedCTDataset, collate
from core.data.pathologies import PATHOLOGIES
from core.data.preprocess import Preprocessing, preprocess_file
from core.registry import ConfigError
from tests.data_fixtures import SHAPE, copy_dataset, data_config, labels, reports


def _volume_files(cfg, split="train"):
    return sorted((cache_path(cfg) / split / "volumes").glob("*.npy"))


def test_round_trip_items_are_aligned_with_their_volume(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    summary = prepare(cfg, progress=False)
    assert summary.splits["train"].volumes == 10 and summary.splits["valid"].volumes == 4
    assert summary.processed == 14 and summary.skipped_count == 0
    dataset = CachedCTDataset(cfg, "train")
    assert len(dataset) == 10
    report_rows = reports(dataset_copy).set_index("VolumeName")
    label_rows = labels(dataset_copy).set_index("VolumeName")
    records = {r.name: r for r in read_split(cfg, "train").records}
    prep = Preprocessing.from_config(cfg)
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"volume", "text", "labels", "name"}
        assert item["volume"].shape == (1, *SHAPE) and item["volume"].dtype == torch.float32
        assert item["volume"].min() >= -1.0 and item["volume"].max() <= 1.0
        row = report_rows.loc[item["name"]]
        assert item["text"] == row.Findings_EN  # training text: the Findings, as CT-CLIP
        expected = torch.tensor(label_rows.loc[item["name"], list(PATHOLOGIES)].to_numpy(dtype=np.float32))
        assert item["labels"].dtype == torch.float32 and torch.equal(item["labels"], expected)
        r = records[item["name"]]  # the cached volume is this name's file, preprocessed
        fresh = preprocess_file(r.path, prep, r.slope, r.intercept, r.spacing)
        np.testing.assert_allclose(item["volume"][0].numpy(), fresh, atol=1e-3)


def test_collate_stacks_a_batch(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("valid",), progress=False)
    dataset = CachedCTDataset(cfg, "valid")
    batch = collate([dataset[i] for i in range(3)])
    assert batch["volume"].shape == (3, 1, *SHAPE) and batch["labels"].shape == (3, len(PATHOLOGIES))
    assert batch["name"] == dataset.names[:3] and batch["text"] == dataset.texts[:3]


def test_second_prepare_does_no_work(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, progress=False)
    before = {p: p.stat().st_mtime_ns for p in cache_path(cfg).rglob("*")}
    time.sleep(0.01)
    again = prepare(cfg, progress=False)
    assert again.processed == 0 and again.splits["train"].reused == 10
    assert {p: p.stat().st_mtime_ns for p in cache_path(cfg).rglob("*")} == before


@pytest.mark.parametrize("override", ["data.hu_window=[-1200, 600]", "data.target_spacing=[10.0, 6.0, 6.0]",
                                      "data.target_shape=[8, 32, 32]", "data.cache_dtype=int16"])
def test_changed_preprocessing_rebuilds_and_never_serves_stale(dataset_copy, tmp_path, override):
    base = data_config(dataset_copy, tmp_path / "cache")
    prepare(base, splits=("valid",), progress=False)
    changed = data_config(dataset_copy, tmp_path / "cache", override)
    assert cache_path(changed) != cache_path(base)
    with pytest.raises(ConfigError, match="no prepared cache"):
        CachedCTDataset(changed, "valid")
    assert prepare(changed, splits=("valid",), progress=False).processed == 4
    old, new = CachedCTDataset(base, "valid")[0]["volume"], CachedCTDataset(changed, "valid")[0]["volume"]
    assert old.shape != new.shape or not torch.allclose(old, new)
    assert prepare(base, splits=("valid",), progress=False).processed == 0  # the old settings are still there


def test_interrupted_prepare_resumes_with_only_the_missing_volumes(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("train",), progress=False)
    files = _volume_files(cfg)
    removed, kept = files[:3], files[3:]
    for path in removed:
        path.unlink()
    # a half-written temporary file, as a killed worker leaves it
    (removed[0].parent / f"{removed[0].name}.tmp-99999").write_bytes(b"\x93NUMPY partial")
    kept_times = {p: p.stat().st_mtime_ns for p in kept}
    summary = prepare(cfg, splits=("train",), progress=False)
    assert summary.processed == 3 and summary.splits["train"].reused == 7
    assert all(p.is_file() for p in removed)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept_times
    assert len(CachedCTDataset(cfg, "train")) == 10


def test_changed_source_file_is_redone(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("train",), progress=False)
    source = read_split(cfg, "train").records[4].path
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    summary = prepare(cfg, splits=("train",), progress=False)
    assert summary.processed == 1
    assert len(_volume_files(cfg)) == 10  # the stale version was removed


def test_changed_metadata_row_is_redone(dataset_copy, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("valid",), progress=False)
    path = dataset_copy / "metadata" / "validation_metadata.csv"
    text = path.read_text().splitlines()
    header = text[0].split(",")
    row = text[1].split(",")
    row[header.index("RescaleIntercept")] = "-900.0"
    path.write_text("\n".join([text[0], ",".join(row), *text[2:]]) + "\n")
    assert prepare(cfg, splits=("valid",), progress=False).processed == 1


def test_int16_cache_matches_float16_cache(dataset_copy, tmp_path):
    f16 = data_config(dataset_copy, tmp_path / "cache")
    i16 = data_config(dataset_copy, tmp_path / "cache", "data.cache_dtype=int16")
    for cfg in (f16, i16):
        prepare(cfg, splits=("valid",), progress=False)
    torch.testing.assert_close(CachedCTDataset(i16, "valid").volume(1), CachedCTDataset(f16, "valid").volume(1),
                               atol=1e-3, rtol=0)
    assert np.load(_volume_files(i16, "valid")[0], mmap_mode="r").dtype == np.int16


def test_worker_processes_give_the_same_cache(dataset_copy, tmp_path):
    inline = data_config(dataset_copy, tmp_path / "a")
    pooled = data_config(dataset_copy, tmp_path / "b")
    prepare(inline, splits=("valid",), workers=1, progress=False)
    assert prepare(pooled, splits=("valid",), workers=2, progress=False).processed == 4
    for a, b in zip(_volume_files(inline, "valid"), _volume_files(pooled, "valid"), strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(np.load(a), np.load(b))


def test_subset_shares_volumes_with_the_full_set(dataset_copy, tmp_path):
    full = data_config(dataset_copy, tmp_path / "cache")
    half = data_config(dataset_copy, tmp_path / "cache", "data.subset_fraction=0.5")
    assert prepare(half, splits=("train",), progress=False).processed == 5
    assert len(CachedCTDataset(half, "train")) == 5
    assert index_path(half, "train") != index_path(full, "train")
    assert prepare(full, splits=("train",), progress=False).processed == 5  # only the other half


def test_fingerprint_is_stable_and_content_based(dataset_copy, synthetic_source, tmp_path):
    cfg = data_config(dataset_copy, tmp_path / "cache")
    prepare(cfg, splits=("valid",), progress=False)
    first = data_fingerprint(cfg, "valid")
    assert first == data_fingerprint(cfg, "valid") and len(first) == 16
    other = data_config(copy_dataset(synthetic_source, tmp_path / "elsewhere"), tmp_path / "cache2")
    prepare(other, splits=("valid",), progress=False)
    assert data_fingerprint(other, "valid") == first  # same data in another folder
    path = dataset_copy / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    table = labels(dataset_copy, "valid")
    table.loc[0, "Emphysema"] = 1 - table.loc[0, "Emphysema"]
    table.to_csv(path, index=False)
    prepare(cfg, splits=("valid",), progress=False)
    assert data_fingerprint(cfg, "valid") != first


def test_dataset_without_prepare_says_how_to_prepare(dataset_copy, tmp_path):
    with pytest.raises(ConfigError, match="ctlab data prepare --root"):
        CachedCTDataset(data_config(dataset_copy, tmp_path / "cache"), "train")


def test_cache_too_big_for_the_disk_is_refused_before_any_volume_is_written(dataset_copy, tmp_path):
    # 12 volumes of 4096³ float16 (1.6 TB): more than this machine's disk holds.
    cfg = data_config(dataset_copy, tmp_path / "cache", "data.target_shape=[4096, 4096, 4096]")
    with pytest.raises(ConfigError, match=r"need \d+\.\d GB but the disk has .* data.target_shape"):
        prepare(cfg, progress=False)
    assert _volume_files(cfg) == [] and _volume_files(cfg, "valid") == []
