"""A frozen text tower's report features: computed once, equal to the live tower, reloaded, repaired."""

import logging

import torch

from core.config import load_config
from core.text import create_text_encoder
from core.text_cache import FeatureCollate, features_path, report_features

REPORTS = ["Lung nodule is present in the right upper lobe. No emphysema is seen.",
           "Cardiomegaly is present. Pleural effusion is not present.", "Thorax CT within normal limits."]


def _encoder():
    torch.manual_seed(0)
    return create_text_encoder("tiny-random", pool="cls", unit="sentence")


def test_features_equal_the_eval_mode_tower_and_are_reused(tmp_path):
    encoder = _encoder().train()
    path = tmp_path / "features.pt"
    features = report_features(encoder, REPORTS, path, batch_size=2)
    assert encoder.training  # the caller's mode is restored
    with torch.no_grad():
        expected = encoder.eval()(**encoder.tokenize(REPORTS))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    stamp = path.stat().st_mtime_ns
    again = report_features(_encoder(), REPORTS, path)
    assert path.stat().st_mtime_ns == stamp  # loaded, not recomputed
    torch.testing.assert_close(again, features)


def test_a_corrupt_or_stale_file_is_recomputed_with_a_warning(tmp_path, caplog):
    path = tmp_path / "features.pt"
    path.write_bytes(b"not a tensor")
    with caplog.at_level(logging.WARNING, logger="core.text_cache"):
        features = report_features(_encoder(), REPORTS, path)
    assert "unreadable" in caplog.text and features.shape == (3, 64)
    torch.save(torch.zeros(2, 64), path)
    with caplog.at_level(logging.WARNING, logger="core.text_cache"):
        assert report_features(_encoder(), REPORTS, path).shape == (3, 64)
    assert "expected (3, 64)" in caplog.text


def test_cache_key_follows_the_tower_settings_and_texts(tmp_path):
    base = load_config(None, [f"data.cache_dir={tmp_path}", "model.text_encoder=tiny-random"])
    other = load_config(None, [f"data.cache_dir={tmp_path}", "model.text_encoder=tiny-random",
                               "model.text_unit=sentence"])
    assert features_path(base, REPORTS) == features_path(base, list(REPORTS))
    assert features_path(base, REPORTS) != features_path(other, REPORTS)
    assert features_path(base, REPORTS) != features_path(base, REPORTS[:2])
    assert features_path(base, REPORTS).parent == tmp_path / "text-features"


def test_feature_collate_adds_each_items_features():
    features = torch.arange(6.0).reshape(3, 2)
    collate = FeatureCollate(lambda items: {"text": [i["text"] for i in items]}, REPORTS, features)
    batch = collate([{"text": REPORTS[2]}, {"text": REPORTS[0]}])
    torch.testing.assert_close(batch["text_features"], features[[2, 0]])
