"""``ctlab data synth | prepare | info`` and the data-loading benchmark."""

import json

import pytest

from core.cli import main
from core.data.bench import bench_data
from core.data.cache import summary_path
from tests.data_fixtures import SHAPE, SPACING, copy_dataset, data_config

TINY = [f"data.target_shape={list(SHAPE)}", f"data.target_spacing={list(SPACING)}"]


@pytest.mark.parametrize("argv", [["data"], ["data", "synth"], ["data", "prepare"], ["data", "info"]])
def test_every_data_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: ctlab data" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prepare", "info"])
def test_root_help_names_both_ct_rate_layouts(command, capsys):
    """``--root`` takes a v2 download (``*_fixed`` folders) as well as v1; its help says so."""
    with pytest.raises(SystemExit):
        main(["data", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train_fixed/, valid_fixed/ (v2) or train/, valid/ (v1)" in text


def test_synth_prepare_info_from_the_command_line(tmp_path, capsys):
    root, cache = tmp_path / "root", tmp_path / "cache"
    assert main(["data", "synth", "--out", str(root), "--train", "3", "--valid", "2", "--shape", *map(str, SHAPE),
                 "--workers", "1", "--no-progress"]) == 0
    assert "train 3 volumes, valid 2 volumes" in capsys.readouterr().out
    assert main(["data", "prepare", "--root", str(root), "--cache", str(cache), "--workers", "1", "--no-progress",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "train: 3 volumes ready (3 preprocessed now, 0 reused); skipped 0" in out
    assert "valid: 2 volumes ready (2 preprocessed now, 0 reused)" in out
    assert main(["data", "info", "--root", str(root), "--cache", str(cache), *TINY]) == 0
    out = capsys.readouterr().out
    assert "train: 3 volumes; skipped 0" in out and "valid: 2 volumes" in out and str(cache) in out


def test_info_lists_skipped_files_and_unprepared_splits(synthetic_source, tmp_path, capsys):
    root = copy_dataset(synthetic_source, tmp_path)
    bad = sorted((root / "valid").rglob("*.nii.gz"))[0]
    bad.write_bytes(b"")
    argv = ["--root", str(root), "--cache", str(tmp_path / "cache"), *TINY]
    assert main(["data", "prepare", "--splits", "valid", "--workers", "1", "--no-progress", *argv]) == 0
    assert f"skipped {bad}: empty_file" in capsys.readouterr().out
    assert main(["data", "info", *argv]) == 0
    out = capsys.readouterr().out
    assert "train: not prepared; run `ctlab data prepare" in out
    assert "valid: 3 volumes; skipped 1: empty_file 1" in out and f"skipped {bad}: empty_file" in out
    cfg = data_config(root, tmp_path / "cache")
    assert json.loads(summary_path(cfg, "valid").read_text())["skipped_files"][0]["file"] == str(bad)


def test_prepare_with_a_missing_root_exits_2_with_the_fix(tmp_path, capsys):
    assert main(["data", "prepare", "--root", str(tmp_path / "absent"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "ctlab data: error: data.root" in err and "ctlab data synth --out" in err


def test_bench_data_compares_both_paths_on_the_same_volumes(synthetic_source, tmp_path):
    cfg = data_config(synthetic_source, tmp_path / "cache")
    result = bench_data(cfg, "train", n=4)
    assert result["volumes"] == 4 and result["shape"] == list(SHAPE)
    assert result["onthefly_volumes_per_s"] > 0 and result["cached_volumes_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["cached_volumes_per_s"] / result["onthefly_volumes_per_s"])
    assert result["max_abs_diff"] < 1e-3  # both paths give the same volumes
