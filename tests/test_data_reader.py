"""The CT-RATE reader: joins volumes, reports, labels and metadata on VolumeName; set-up errors are clear."""

import pandas as pd
import pytest

from core.data.ctrate import read_split
from core.data.pathologies import PATHOLOGIES
from core.registry import ConfigError
from tests.data_fixtures import data_config, labels, metadata, reports


def test_records_join_text_labels_and_metadata_by_volume_name(synthetic_source, tmp_path):
    listing = read_split(data_config(synthetic_source, tmp_path), "train")
    assert len(listing.records) == 10 and listing.skipped == []
    report_rows = reports(synthetic_source).set_index("VolumeName")
    label_rows = labels(synthetic_source).set_index("VolumeName")
    meta_rows = metadata(synthetic_source).set_index("VolumeName")
    for record in listing.records:
        assert record.path.name == record.name and record.path.is_file()
        assert record.path.parent.parent.name == record.name.rsplit("_", 2)[0]  # train/train_1/train_1_a/...
        row = report_rows.loc[record.name]
        assert record.text == row.Findings_EN  # CT-CLIP trains on the Findings only
        assert record.labels == tuple(float(v) for v in label_rows.loc[record.name, list(PATHOLOGIES)])
        meta = meta_rows.loc[record.name]
        assert (record.slope, record.intercept) == (meta.RescaleSlope, meta.RescaleIntercept)
        xy = float(meta.XYSpacing.strip("[]").split(",")[0])
        assert record.spacing == pytest.approx((meta.ZSpacing, xy, xy))


def test_text_fields_are_configurable(synthetic_source, tmp_path):
    rows = reports(synthetic_source, "valid").set_index("VolumeName")
    default = read_split(data_config(synthetic_source, tmp_path), "valid").records[0]
    row = rows.loc[default.name]
    assert default.text == f"{row.Findings_EN} {row.Impressions_EN}"  # CT-CLIP validates on both
    cfg = data_config(synthetic_source, tmp_path, "data.text_fields=[Impressions_EN]")  # one list: every split
    for split in ("train", "valid"):
        record = read_split(cfg, split).records[0]
        assert record.text == reports(synthetic_source, split).set_index("VolumeName").loc[record.name].Impressions_EN
    per_split = data_config(synthetic_source, tmp_path, "data.text_fields={train: [Impressions_EN, Findings_EN]}")
    with pytest.raises(ConfigError, match=r"data\.text_fields has no entry for split 'valid'"):
        read_split(per_split, "valid")


def test_subset_is_seeded_and_sized(synthetic_source, tmp_path):
    names = lambda *o: [r.name for r in read_split(data_config(synthetic_source, tmp_path, *o), "train").records]  # noqa: E731
    half = names("data.subset_fraction=0.5", "data.subset_seed=1")
    assert len(half) == 5 and half == names("data.subset_fraction=0.5", "data.subset_seed=1")
    assert half != names("data.subset_fraction=0.5", "data.subset_seed=2")
    assert set(half) <= set(names())


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root .*nowhere.* does not exist.*ctlab data synth"):
        read_split(data_config(tmp_path / "nowhere", tmp_path / "cache"), "train")


def test_missing_csv_is_a_config_error(dataset_copy, tmp_path):
    (dataset_copy / "metadata" / "train_metadata.csv").unlink()
    with pytest.raises(ConfigError, match=r"data\.metadata_csv\.train: .*train_metadata\.csv' does not exist"):
        read_split(data_config(dataset_copy, tmp_path / "cache"), "train")


def test_csv_without_required_columns_names_them(dataset_copy, tmp_path):
    path = dataset_copy / "multi_abnormality_labels" / "train_predicted_labels.csv"
    pd.read_csv(path).drop(columns=["Cardiomegaly", "Emphysema"]).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) Cardiomegaly, Emphysema"):
        read_split(data_config(dataset_copy, tmp_path / "cache"), "train")


def test_unknown_split_is_a_config_error(synthetic_source, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.reports_csv has no entry for split 'test'"):
        read_split(data_config(synthetic_source, tmp_path), "test")


def test_not_given_fields_are_dropped_and_an_empty_training_text_is_skipped(dataset_copy, tmp_path):
    train_csv = dataset_copy / "radiology_text_reports" / "train_reports.csv"
    valid_csv = dataset_copy / "radiology_text_reports" / "validation_reports.csv"
    train, valid = pd.read_csv(train_csv), pd.read_csv(valid_csv)
    train.loc[0, "Findings_EN"] = "Not given."
    valid.loc[0, "Impressions_EN"] = "Not given."
    train.to_csv(train_csv, index=False)
    valid.to_csv(valid_csv, index=False)
    cfg = data_config(dataset_copy, tmp_path)
    listing = read_split(cfg, "train")
    assert [(s.file.rsplit("/", 1)[-1], s.reason) for s in listing.skipped] == [(train.VolumeName[0], "no_report")]
    texts = {r.name: r.text for r in read_split(cfg, "valid").records}
    assert texts[valid.VolumeName[0]] == valid.Findings_EN[0]  # "Not given." impressions leave no trace
    kept = data_config(dataset_copy, tmp_path, "data.drop_text=[]", "data.text_fields=[Findings_EN, Impressions_EN]")
    assert {r.name: r.text for r in read_split(kept, "valid").records}[valid.VolumeName[0]].endswith(" Not given.")
    assert len(read_split(kept, "train").records) == 10


def test_ctclip_first80_keeps_the_first_80_percent_of_train_only(synthetic_source, tmp_path):
    cfg = data_config(synthetic_source, tmp_path, "data.subset=ctclip_first80")
    every = sorted(r.name for r in read_split(data_config(synthetic_source, tmp_path), "train").records)
    assert [r.name for r in read_split(cfg, "train").records] == every[:8]  # int(10 × 80 / 100)
    assert len(read_split(cfg, "valid").records) == 4
    both = data_config(synthetic_source, tmp_path, "data.subset=ctclip_first80", "data.subset_fraction=0.5")
    assert set(r.name for r in read_split(both, "train").records) < set(every[:8])


def test_bad_data_options_are_config_errors(synthetic_source, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.rescale: 'metadta' is not a valid value.*metadata"):
        data_config(synthetic_source, tmp_path, "data.rescale=metadta")
    with pytest.raises(ConfigError, match=r"data\.text_fields: name at least one report column"):
        data_config(synthetic_source, tmp_path, "data.text_fields={train: [], valid: [Findings_EN]}")
    with pytest.raises(ConfigError, match=r"data\.subset: 'ctclip80'.*ctclip_first80"):
        data_config(synthetic_source, tmp_path, "data.subset=ctclip80")
