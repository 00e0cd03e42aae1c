"""Preprocessing: HU conversion, resampling, HU window, crop/pad and the NIfTI → canonical (D, H, W) axis order."""

import gzip

import numpy as np
import pytest
import torch

from core.config import load_config
from core.data.ctrate import parse_xy_spacing
from core.data.intensity import ctclip as window
from core.data.orientation import LPS_TO_DHW
from core.data.preprocess import (
    BadVolume,
    Preprocessing,
    crop_or_pad,
    decode,
    decode_file,
    encode,
    load_nifti,
    preprocess_file,
    resample,
    resampled_shape,
    to_hu,
)
from tests.data_fixtures import write_nifti

WIDE = (-4000.0, 4000.0)  # a window that clips nothing, so [-1, 1] values map back to HU exactly


def _back_to_hu(volume: np.ndarray, low: float = WIDE[0], high: float = WIDE[1]) -> np.ndarray:
    return (volume + 1.0) / 2.0 * (high - low) + low


def test_hu_from_header_scaling_matches_hand_computed_voxels(tmp_path):
    raw = np.zeros((4, 5, 6), dtype=np.int16)
    raw[0, 0, 0], raw[1, 2, 3], raw[3, 4, 5] = 0, 1024, 3000
    path = write_nifti(tmp_path / "v.nii.gz", raw, slope=0.5, inter=-1024.0)
    volume = load_nifti(path)
    assert volume.slope == 0.5 and volume.intercept == -1024.0
    hu = to_hu(volume.raw, volume.slope, volume.intercept)
    # stored LPS, so the volume is (D, H, W) = (k, i, j)
    assert hu[0, 0, 0] == -1024.0  # 0 × 0.5 − 1024
    assert hu[3, 1, 2] == -512.0  # 1024 × 0.5 − 1024
    assert hu[5, 3, 4] == 476.0  # 3000 × 0.5 − 1024


@pytest.mark.parametrize("mode, air_raw, body_hu", [
    ("metadata", 12, 2.0 * 1000 - 1024),  # the CSV's 2 / −1024 on the stored values, header ignored
    ("header", -1952, 0.5 * 1000 - 24),  # the header's 0.5 / −24, the CSV ignored
    ("none", -1000, 1000.0),  # stored values taken as HU
])
def test_forced_rescale_reads_the_stored_values_that_way(tmp_path, mode, air_raw, body_hu):
    raw = np.full((8, 8, 8), air_raw, dtype=np.int16)  # air (−1000 HU) under this reading
    raw[2:-2, 2:-2, 2:-2] = 1000
    path = write_nifti(tmp_path / "v.nii.gz", raw, slope=0.5, inter=-24.0)
    prep = Preprocessing((1.0, 1.0, 1.0), (8, 8, 8), WIDE, rescale=mode)
    out = _back_to_hu(preprocess_file(path, prep, slope=2.0, intercept=-1024.0))
    assert out[4, 4, 4] == pytest.approx(body_hu, abs=0.2)
    assert out[0, 0, 0] == pytest.approx(-1000.0, abs=0.2)


def test_window_clips_and_scales_to_unit_range():
    hu = np.array([-3000.0, -1000.0, -500.0, 0.0, 1000.0, 2500.0], dtype=np.float32)
    np.testing.assert_allclose(window(hu, (-1000.0, 1000.0)), [-1.0, -1.0, -0.5, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(window(hu, (-500.0, 1500.0)), [-1.0, -1.0, -1.0, -0.5, 0.5, 1.0], atol=1e-6)


def test_resampled_shape_follows_spacing_ratio():
    volume = np.zeros((10, 20, 30), dtype=np.float32)
    out = resample(volume, (3.0, 1.5, 1.0), (1.5, 0.75, 2.0))
    assert out.shape == (20, 40, 15)
    assert resampled_shape((240, 512, 512), (1.25, 0.7, 0.7), (1.5, 0.75, 0.75)) == (200, 478, 478)


def test_resampling_keeps_a_constant_volume_constant_and_a_ramp_monotone():
    flat = np.full((6, 8, 8), 37.0, dtype=np.float32)
    np.testing.assert_allclose(resample(flat, (2.0, 1.0, 1.0), (1.0, 0.5, 2.0)), 37.0, atol=1e-4)
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 4, 4)).copy()
    out = resample(ramp, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert out.shape == (12, 4, 4) and np.all(np.diff(out[:, 0, 0]) >= 0)


def test_crop_is_centred():
    volume = np.arange(10, dtype=np.float32).reshape(10, 1, 1) * np.ones((10, 4, 4), dtype=np.float32)
    out = crop_or_pad(volume, (6, 4, 4))
    np.testing.assert_array_equal(out[:, 0, 0], [2, 3, 4, 5, 6, 7])


def test_pad_is_centred_with_minus_one():
    volume = np.ones((4, 3, 2), dtype=np.float32)
    out = crop_or_pad(volume, (8, 5, 2))
    assert out.shape == (8, 5, 2)
    assert out[2:6, 1:4, :].min() == 1.0  # (8-4)//2 = 2 before, (5-3)//2 = 1 before
    assert out.sum() == 4 * 3 * 2 - (8 * 5 * 2 - 4 * 3 * 2)
    assert set(np.unique(out)) == {-1.0, 1.0}


def test_odd_crop_and_pad_put_the_extra_voxel_at_the_end():
    volume = np.arange(5, dtype=np.float32).reshape(5, 1, 1)
    np.testing.assert_array_equal(crop_or_pad(volume, (2, 1, 1))[:, 0, 0], [1, 2])  # start (5-2)//2 = 1
    np.testing.assert_array_equal(crop_or_pad(volume, (8, 1, 1))[:, 0, 0], [-1, 0, 1, 2, 3, 4, -1, -1])


def test_axis_order_lps_ijk_becomes_dhw_kij_as_ctclip(tmp_path):
    """An LPS-stored data[i, j, k] (right→left, anterior→posterior, slices) lands at volume[k, i, j]:
    CT-CLIP's permute(2, 0, 1) of CT-RATE's array."""
    x, y, z = 6, 5, 4  # asymmetric so any wrong transpose changes the shape
    data = np.full((x, y, z), -1000, dtype=np.int16)  # air
    data[1, 3, 2] = 1000  # a single marked voxel
    data[4, 0, 0] = 500
    path = write_nifti(tmp_path / "asym.nii.gz", data, zooms=(0.5, 0.7, 2.0))
    volume = load_nifti(path)
    assert LPS_TO_DHW == (2, 0, 1)
    assert volume.raw.shape == (z, x, y)
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.7))  # header zooms (x, y, z) → (D, H, W) = (z, x, y)
    out = _back_to_hu(preprocess_file(path, Preprocessing((2.0, 0.5, 0.7), (z, x, y), WIDE)))
    assert out.shape == (4, 6, 5)
    assert out[2, 1, 3] == pytest.approx(1000.0, abs=0.1)
    assert out[0, 4, 0] == pytest.approx(500.0, abs=0.1)
    assert np.count_nonzero(out > -0.2) == 2


def test_spacing_from_metadata_resamples_the_right_axes(tmp_path):
    data = np.full((6, 5, 4), -1000, dtype=np.int16)  # LPS (x=H, y=W, z=D), air
    data[0, 0, 0] = 0  # not constant
    path = write_nifti(tmp_path / "v.nii.gz", data, zooms=(1.0, 1.0, 1.0))
    prep = Preprocessing((1.0, 1.0, 1.0), (100, 100, 100), WIDE)
    out = preprocess_file(path, prep, spacing=(3.0, 2.0, 1.0))  # model order (D, H, W) = (Z, XY[1], XY[0])
    # resampled to (4*3, 6*2, 5*1) = (12, 12, 5) voxels, then centre-padded with -1 to 100³
    assert out.shape == (100, 100, 100)
    inside = np.argwhere(out > -0.99)
    assert len(inside) == 12 * 12 * 5
    assert tuple(inside.max(axis=0) - inside.min(axis=0) + 1) == (12, 12, 5)
    assert tuple(inside.min(axis=0)) == (44, 44, 47)  # (100-12)//2, (100-12)//2, (100-5)//2


def test_xy_spacing_parses_ctrate_strings():
    assert parse_xy_spacing("[0.75, 0.75]") == (0.75, 0.75)
    assert parse_xy_spacing("[0.7578125, 0.7578125]") == (0.7578125, 0.7578125)
    assert parse_xy_spacing("0.8") == (0.8, 0.8)
    assert parse_xy_spacing("nan") is None and parse_xy_spacing("[0, 0.7]") is None


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("int16", 2e-5)])
def test_cache_encoding_round_trips(dtype, tolerance):
    values = np.linspace(-1, 1, 1001, dtype=np.float32)
    stored = encode(values, dtype)
    assert stored.dtype == np.dtype(dtype)
    decoded = decode(stored)
    assert decoded.dtype == torch.float32
    np.testing.assert_allclose(decoded.numpy(), values, atol=tolerance)


def _chest(shape=(8, 8, 8)) -> np.ndarray:
    """Stored values (LPS, already HU) of a plausible CT: air around a water block."""
    raw = np.full(shape, -1000, dtype=np.int16)
    raw[2:-2, 2:-2, 2:-2] = 40
    return raw


def test_non_finite_hu_is_a_bad_volume_saying_how_many_voxels():
    raw = np.zeros((2, 2, 2), dtype=np.float32)
    raw[0, 0, 0], raw[1, 1, 1] = np.nan, np.inf
    with pytest.raises(BadVolume) as err:
        to_hu(raw, 1.0, 0.0)
    assert (err.value.reason, err.value.detail) == ("non_finite", "2 of 8 voxels are NaN or infinite")
    assert str(err.value) == "non_finite: 2 of 8 voxels are NaN or infinite"


@pytest.mark.parametrize("spacing", [(0.0, 0.75, 0.75), (1.5, float("inf"), 0.75), (1.5, 0.75, float("nan")),
                                     (-1.5, 0.75, 0.75)])
def test_a_spacing_that_is_not_positive_and_finite_is_a_bad_volume(tmp_path, spacing):
    path = write_nifti(tmp_path / "v.nii.gz", _chest())
    with pytest.raises(BadVolume) as err:
        decode_file(path, Preprocessing((1.0, 1.0, 1.0), (8, 8, 8), WIDE), spacing=spacing)
    assert (err.value.reason, err.value.detail) == ("bad_spacing", f"voxel spacing {spacing} mm")


def test_a_metadata_row_without_an_intercept_is_no_rescale(tmp_path):
    """Half a rescale (slope, no intercept) is not applied: the volume is read as if the CSV had no row."""
    path = write_nifti(tmp_path / "v.nii.gz", _chest(), slope=None, inter=None)
    prep = Preprocessing((1.0, 1.0, 1.0), (8, 8, 8), WIDE)
    decoded = decode_file(path, prep, slope=2.0, intercept=None)
    plain = decode_file(path, prep)
    assert decoded.rescale == plain.rescale == "none" and decoded.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(decoded.hu, plain.hu)
    assert decoded.hu.min() == -1000.0 and decoded.hu.max() == 40.0


def test_an_implausible_volume_is_a_bad_volume_with_the_reason(tmp_path):
    path = write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8, 8), dtype=np.int16))
    with pytest.raises(BadVolume) as err:
        decode_file(path, Preprocessing((1.0, 1.0, 1.0), (8, 8, 8), WIDE))
    assert err.value.reason == "implausible_hu" and err.value.detail.startswith("every voxel holds 0 HU")


@pytest.mark.parametrize(("make", "reason", "detail"), [
    (lambda p: p.write_bytes(b""), "empty_file", "0 bytes"),
    (lambda p: p.write_bytes(gzip.compress(b"not a nifti at all" * 40)), "unreadable", None),
    (lambda p: write_nifti(p, np.zeros((6, 6), dtype=np.int16)), "bad_dims",
     "array shape (6, 6), expected 3 axes (X, Y, Z)"),
    (lambda p: write_nifti(p, np.zeros((6, 6, 4, 2), dtype=np.int16)), "bad_dims",
     "array shape (6, 6, 4, 2), expected 3 axes (X, Y, Z)"),
    (lambda p: write_nifti(p, np.zeros((6, 1, 4), dtype=np.int16)), "bad_dims",
     "array shape (6, 1, 4) has an axis shorter than 2 voxels"),
    (lambda p: write_nifti(p, np.zeros((6, 6, 1), dtype=np.int16)), "bad_dims",  # one slice: 3 axes, one too short
     "array shape (6, 6, 1) has an axis shorter than 2 voxels"),
])
def test_unusable_files_are_bad_volumes_naming_why(tmp_path, make, reason, detail):
    path = tmp_path / "v.nii.gz"
    make(path)
    with pytest.raises(BadVolume) as err:
        load_nifti(path)
    assert err.value.reason == reason
    if detail is not None:
        assert err.value.detail == detail
    else:
        assert err.value.detail  # the decoder's own error, named


def test_a_trailing_length_one_axis_is_dropped_and_the_header_read(tmp_path):
    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4, 1)
    path = write_nifti(tmp_path / "v.nii.gz", raw, zooms=(0.5, 0.7, 2.0, 1.0), slope=2.0, inter=-1024.0)
    volume = load_nifti(path)
    assert volume.raw.shape == (4, 6, 5) and volume.raw.dtype == np.int16
    np.testing.assert_array_equal(volume.raw, raw[..., 0].transpose(2, 0, 1))  # unscaled, LPS → (D, H, W)
    assert (volume.slope, volume.intercept) == (2.0, -1024.0)
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.7))
    assert (volume.header_rescale.slope, volume.header_rescale.intercept) == (2.0, -1024.0)


def test_an_axis_of_two_voxels_is_enough(tmp_path):
    volume = load_nifti(write_nifti(tmp_path / "v.nii.gz", np.zeros((6, 2, 4), dtype=np.int16)))
    assert volume.raw.shape == (4, 6, 2)


def test_preprocessed_volume_is_float32_and_padded_with_exactly_minus_one(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", _chest())
    out = preprocess_file(path, Preprocessing((1.0, 1.0, 1.0), (12, 8, 8), WIDE))
    assert out.dtype == np.float32 and out.shape == (12, 8, 8)
    assert (out[:2] == -1.0).all() and (out[-2:] == -1.0).all()
    assert crop_or_pad(np.zeros((3, 3, 3), dtype=np.float32), (5, 5, 5)).dtype == np.float32


def test_crop_or_pad_and_resampled_shape_reject_a_shape_of_another_rank():
    with pytest.raises(ValueError):
        crop_or_pad(np.zeros((4, 4, 4), dtype=np.float32), (4, 4, 4, 4))
    with pytest.raises(ValueError):
        resampled_shape((4, 4, 4), (1.0, 1.0), (1.0, 1.0, 1.0))


def test_resampled_shape_keeps_at_least_one_voxel():
    assert resampled_shape((1, 4, 4), (1.0, 1.0, 1.0), (10.0, 1.0, 1.0)) == (1, 4, 4)


def test_resampling_samples_at_voxel_centres_as_torch_trilinear():
    """Half-voxel convention (align_corners=False, as CT-CLIP's F.interpolate): doubling a ramp 0..3 samples it at
    (i + 0.5) / 2 − 0.5, clamped at the ends."""
    ramp = np.arange(4, dtype=np.float32).reshape(4, 1, 1) * np.ones((4, 2, 2), dtype=np.float32)
    out = resample(ramp, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert out.shape == (8, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])


def test_preprocessing_from_config_keeps_every_setting():
    cfg = load_config(None, ["data.rescale=none", "data.intensity=dcformer", "data.target_spacing=[1.5, 0.75, 0.75]",
                             "data.target_shape=[24, 48, 48]"]).data
    prep = Preprocessing.from_config(cfg)
    assert prep == Preprocessing((1.5, 0.75, 0.75), (24, 48, 48), tuple(map(float, cfg.hu_window)), rescale="none",
                                 intensity="dcformer")
