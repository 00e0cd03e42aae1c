"""The settings a DCFormer run trains with: its intensity normalisation and its fixed temperature."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import load_config
from core.data.cache import cache_settings, cache_tag
from core.data.intensity import apply_intensity
from core.data.preprocess import Preprocessing, preprocess_file
from core.lora import apply_adaptation
from core.model import build_model
from core.optim import create_optimizer
from core.registry import ConfigError
from experiments.matrix import load_matrix
from tests.data_fixtures import write_nifti

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
CONFIGS = EXPERIMENTS / "configs"
HU = np.array([-3024.0, -1000.0, -700.0, -400.0, 0.0, 200.0, 500.0, 1000.0, 2000.0], dtype=np.float32)


def test_dcformer_intensity_is_its_window_and_map():
    """DCFormer's Datasets.py: clip to [-1000, 200], then (x + 400) / 600."""
    expected = [-1.0, -1.0, -0.5, 0.0, 400 / 600, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(apply_intensity("dcformer", HU, (-1000.0, 1000.0)), expected, rtol=0, atol=1e-6)


def test_ctclip_intensity_is_the_hu_window_onto_minus_one_one():
    expected = [-1.0, -1.0, -0.7, -0.4, 0.0, 0.2, 0.5, 1.0, 1.0]  # clip(x, -1000, 1000) / 1000
    np.testing.assert_allclose(apply_intensity("ctclip", HU, (-1000.0, 1000.0)), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(apply_intensity("ctclip", HU, (-1000.0, 200.0)),
                               apply_intensity("dcformer", HU, (-1000.0, 1000.0)), atol=1e-6)


def test_preprocessing_a_nifti_applies_the_configured_intensity(tmp_path):
    raw = np.full((6, 6, 4), 0, dtype=np.int16)
    raw[:, :, 1] = 1424  # HU 400 with the intercept below
    raw[:, :, 2] = 824  # HU -200
    path = write_nifti(tmp_path / "v.nii.gz", raw, zooms=(0.75, 0.75, 1.5), inter=-1024.0)
    out = {}
    for intensity in ("ctclip", "dcformer"):
        cfg = load_config(None, ["data.target_shape=[4, 6, 6]", f"data.intensity={intensity}"])
        out[intensity] = preprocess_file(path, Preprocessing.from_config(cfg.data))
    assert out["ctclip"][1, 0, 0] == pytest.approx(0.4) and out["ctclip"][2, 0, 0] == pytest.approx(-0.2)
    assert out["dcformer"][1, 0, 0] == pytest.approx(1.0) and out["dcformer"][2, 0, 0] == pytest.approx(1 / 3)
    assert out["ctclip"][0, 0, 0] == out["dcformer"][0, 0, 0] == pytest.approx(-1.0)  # -1024 HU: both windows' bottom


def test_the_cache_key_includes_the_intensity_and_keeps_the_default_tag():
    ctclip = load_config(None, []).data
    dcformer = load_config(None, ["data.intensity=dcformer"]).data
    assert cache_tag(ctclip) != cache_tag(dcformer)
    assert "intensity" not in cache_settings(ctclip)  # caches prepared before the option keep their tag
    assert cache_settings(dcformer)["intensity"] == "dcformer"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.intensity=dcformr"], "did you mean 'dcformer'"),
    (["data.intensity=dcformer", "data.hu_window=[-1000, 200]"], "has its own window"),
])
def test_bad_intensity_settings_are_rejected_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _tiny_model(*overrides: str):
    cfg = load_config(None, ["model.encoder=dcformer_nano", "model.text_encoder=tiny-random", "model.latent_dim=16",
                             "data.target_shape=[16, 32, 32]", "train.lr=0.1", "train.device=cpu", *overrides])
    model = build_model(cfg)
    apply_adaptation(model, cfg.model)
    return cfg, model


def _one_step(cfg, model) -> None:
    optimizer = create_optimizer(model, cfg.train, torch.device("cpu"))
    tokens = model.tokenize(["Left lung nodule.", "No effusion.", "Cardiomegaly."])
    out = model(torch.randn(3, 1, 16, 32, 32), tokens["input_ids"], tokens["attention_mask"])
    out["loss"].backward()
    optimizer.step()


def test_a_frozen_logit_scale_stays_at_e_through_training():
    """DCFormer's temperature: exp(1.0) every step, never trained, whatever the adaptation sets trainable."""
    cfg, model = _tiny_model("model.logit_scale_init=1.0", "model.logit_scale_learnable=false")
    assert "loss.logit_scale" not in dict(model.named_parameters())
    assert "loss.logit_scale" in model.state_dict()  # still saved and restored with a checkpoint
    _one_step(cfg, model)
    assert float(model.loss.scale()) == pytest.approx(math.e, rel=1e-7)


def test_a_learnable_logit_scale_moves():
    cfg, model = _tiny_model("model.logit_scale_init=1.0")
    assert model.loss.logit_scale.requires_grad
    _one_step(cfg, model)
    assert float(model.loss.scale().detach()) != pytest.approx(math.e, rel=1e-4)


def test_the_dcformer_preset_is_the_papers_setting():
    cfg = load_config(CONFIGS / "dcformer-tiny.yaml")
    m = cfg.model
    assert (m.encoder, m.encoder_args, m.loss) == ("dcformer_tiny", {"codebook_size": 8192}, "clip")
    assert (m.logit_scale_init, m.logit_scale_learnable, m.latent_dim) == (1.0, False, 512)
    assert m.text_encoder == "microsoft/BiomedVLP-CXR-BERT-specialized"
    assert (cfg.data.intensity, cfg.data.target_shape, cfg.data.target_spacing) == (
        "dcformer", [256, 512, 512], [1.5, 0.75, 0.75])
    t = cfg.train
    assert (t.batch_size, t.epochs, t.warmup_steps, t.weight_decay, t.betas) == (8, 15, 0, 0.05, [0.9, 0.95])
    assert t.lr == pytest.approx(1e-5 * 8 / 256)  # blr × batch / 256 on one GPU (× GPUs under torchrun)
    assert "fixed0.5" in cfg.eval.protocols


@pytest.mark.parametrize(("matrix_file", "codebook"), [("encoders.yaml", None), ("encoders-gpu.yaml", 8192)])
def test_the_encoder_matrices_run_dcformer_at_its_setting_and_the_others_at_ours(matrix_file, codebook):
    """DCFormer cells: its intensities, softmax CLIP loss at the fixed e, its stem (and quantiser on real data);
    every other encoder keeps CT-CLIP's intensities and the matrix's shared loss."""
    cells = load_matrix(EXPERIMENTS / matrix_file).cells
    dcformer = [c.config for c in cells if c.config.model.encoder.startswith("dcformer_")]
    others = [c.config for c in cells if not c.config.model.encoder.startswith("dcformer_")]
    assert sorted(cfg.model.encoder for cfg in dcformer) == ["dcformer_naive", "dcformer_nano", "dcformer_tiny"]
    for cfg in dcformer:
        m = cfg.model
        assert (cfg.data.intensity, m.loss, m.logit_scale_init, m.logit_scale_learnable) == (
            "dcformer", "clip", 1.0, False), m.encoder
        assert m.encoder_args.get("codebook_size") == codebook and "stem_act" not in m.encoder_args, m.encoder
    assert others and all(cfg.data.intensity == "ctclip" and cfg.model.logit_scale_learnable for cfg in others)
