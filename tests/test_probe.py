"""The linear probe (CT-CLIP's CT-LiPro head on frozen embeddings): learning, chance level, metrics, config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from core.config import ConfigError, ProbeConfig, load_config
from core.data import PATHOLOGIES
from core.probe import ProbeHead, positive_weights, train_probe, warmup_cosine

FIXTURES = Path(__file__).parent / "fixtures" / "ctclip_probe"
K = len(PATHOLOGIES)


def _unit_embeddings(n, seed, dim=64, signal=1.0, rectified=True):
    """Unit-norm embeddings (as ``encode_image`` gives) whose labels are a linear rule of their positive part
    (``rectified``: what CT-CLIP's ReLU head can separate) or of the signed embedding; ``signal`` < 1 mixes in noise."""
    g = torch.Generator().manual_seed(seed)
    code = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    direction = torch.randn(dim, K, generator=torch.Generator().manual_seed(99))
    rule = (code.relu() if rectified else code) @ direction
    thresholds = torch.quantile(rule, torch.linspace(0.1, 0.7, K), dim=0).diagonal()  # prevalences 90 % … 30 %
    labels = (rule > thresholds).float()
    features = code * signal + torch.randn(n, dim, generator=g) / dim**0.5 * (1 - signal)
    return torch.nn.functional.normalize(features, dim=-1), labels


def test_probe_separates_linearly_separable_embeddings():
    x_train, y_train = _unit_embeddings(600, 0)
    x_valid, y_valid = _unit_embeddings(300, 1)
    out = train_probe(x_train, y_train, x_valid, y_valid, protocols=["ctclip", "fixed0.5"])
    assert out.scores.shape == (300, K) and ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.metrics["probe_auroc"] > 0.97
    assert out.metrics["probe_f1"] > 0.85
    assert out.steps == 75 * 14  # 75 batches of 8 an epoch; 14 epochs reach min_steps = 1000
    again = train_probe(x_train, y_train, x_valid, y_valid, protocols=["ctclip", "fixed0.5"])
    np.testing.assert_array_equal(out.scores, again.scores)


def test_plain_linear_probe_separates_a_signed_rule_the_relu_head_cannot():
    x_train, y_train = _unit_embeddings(600, 0, rectified=False)
    x_valid, y_valid = _unit_embeddings(300, 1, rectified=False)
    plain = train_probe(x_train, y_train, x_valid, y_valid, ProbeConfig(relu=False))
    assert plain.metrics["probe_auroc"] > 0.97
    relu = train_probe(x_train, y_train, x_valid, y_valid)
    assert relu.metrics["probe_auroc"] < plain.metrics["probe_auroc"] - 0.05  # the ReLU drops the negative half


def test_probe_on_random_labels_is_at_chance():
    x_train, _ = _unit_embeddings(600, 0)
    x_valid, _ = _unit_embeddings(400, 1)
    rng = np.random.default_rng(3)
    y_train, y_valid = (rng.random((600, K)) < 0.3).astype(float), (rng.random((400, K)) < 0.3).astype(float)
    out = train_probe(x_train, y_train, x_valid, y_valid, bootstrap=200)
    assert abs(out.metrics["probe_auroc"] - 0.5) < 0.03
    assert out.metrics["probe_auroc_ci_low"] < 0.5 < out.metrics["probe_auroc_ci_high"]


def test_probe_metrics_are_scikit_learns_on_its_predictions():
    x_train, y_train = _unit_embeddings(300, 0, signal=0.4)
    x_valid, y_valid = _unit_embeddings(200, 1, signal=0.4)
    out = train_probe(x_train, y_train, x_valid, y_valid, protocols=["ctclip", "fixed0.5"],
                      volume_names=[f"valid_{i}" for i in range(200)])
    y, s = y_valid.numpy(), out.scores
    assert 0.6 < out.metrics["probe_auroc"] < 0.97  # a partial signal: the comparison is not at a bound
    assert out.metrics["probe_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, k], s[:, k]) for k in range(K)]))
    assert out.metrics["probe_auprc"] == pytest.approx(
        np.mean([average_precision_score(y[:, k], s[:, k]) for k in range(K)]))
    assert out.metrics["probe_f1_fixed0.5"] == pytest.approx(
        np.mean([f1_score(y[:, k], s[:, k] >= 0.5, average="weighted") for k in range(K)]))
    ctclip = out.per_label[out.per_label.protocol == "ctclip"]
    assert out.metrics["probe_f1"] == pytest.approx(np.mean(
        [f1_score(y[:, k], s[:, k] >= t, average="weighted") for k, t in enumerate(ctclip.threshold)]))
    predictions = out.predictions
    assert list(predictions.columns) == ["VolumeName", "pathology", "score", "label"]
    assert len(predictions) == 200 * K and predictions.VolumeName.iloc[K] == "valid_1"
    np.testing.assert_array_equal(predictions.score.to_numpy().reshape(200, K), s)
    np.testing.assert_array_equal(predictions.label.to_numpy().reshape(200, K), y)


def test_probe_is_seeded_and_leaves_the_global_rng_alone():
    x, y = _unit_embeddings(64, 0)
    cfg = ProbeConfig(min_steps=20)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = train_probe(x, y, x, y, cfg, seed=1)
    torch.testing.assert_close(torch.rand(3), expected)
    other = train_probe(x, y, x, y, cfg, seed=2)
    assert not np.array_equal(first.scores, other.scores)


def test_schedule_is_ctclips_cosine_lr():
    for case in json.loads((FIXTURES / "cosine_lr.json").read_text()):
        ours = [warmup_cosine(step, case["base_lr"], case["warmup"], case["steps"]) for step in range(case["steps"])]
        np.testing.assert_allclose(ours, case["lrs"], rtol=1e-12, atol=0)


def test_class_weights_are_negatives_over_positives():
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(positive_weights(labels), torch.tensor([1.0, 1.0, 1 / 3]))


def test_probe_head_is_ctclips_relu_dropout_linear():
    head = ProbeHead(4, 3, dropout=0.3)
    features = torch.randn(50, 4) * torch.tensor([1.0, 10.0, 100.0, 0.1]) + 7
    head.fit_normalization(features)
    head.eval()
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(3, 4))
        head.linear.bias.zero_()
        z = head(features)
        torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(0), torch.ones(3), atol=1e-5, rtol=0)
        raw = ProbeHead(4, 3).eval()
        negative = -torch.ones(2, 4)
        torch.testing.assert_close(raw(negative), raw.linear.bias.expand(2, 3))  # ReLU first, as CT-CLIP
    assert head.dropout.p == 0.3 and set(dict(head.named_buffers())) == {"mean", "std"}


def test_probe_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="probe inputs"):
        train_probe(torch.zeros(10, 4), torch.zeros(10, 3), torch.zeros(5, 4), torch.zeros(5, 3))


def test_probe_config_defaults_and_typos():
    cfg = load_config(None, ["eval.probe.epochs=3", "eval.probe.class_weight=none"])
    assert cfg.eval.probe.enabled and cfg.eval.probe.epochs == 3 and cfg.eval.probe.class_weight == "none"
    defaults = ProbeConfig()
    assert (defaults.batch_size, defaults.weight_decay, defaults.dropout, defaults.grad_clip) == (8, 0.1, 0.3, 1.0)
    with pytest.raises(ConfigError, match=r"eval\.probe\.epoch'.*epochs"):
        load_config(None, ["eval.probe.epoch=3"])
    with pytest.raises(ConfigError, match=r"eval\.prob'.*probe"):
        load_config(None, ["eval.prob.enabled=false"])
    with pytest.raises(ConfigError, match="eval.probe.dropout"):
        load_config(None, ["eval.probe.dropout=1.5"])
    with pytest.raises(ConfigError, match="balanced"):
        load_config(None, ["eval.probe.class_weight=balance"])


def test_probe_embeddings_are_eval_mode_no_grad_and_follow_the_runs_autocast():
    from torch.utils.data import DataLoader

    from core.data.dataset import collate
    from core.model import build_model
    from core.probe import embed_images
    from core.train import autocast_for

    cfg = load_config(None, ["model.preset=tiny", "data.target_shape=[16,32,32]", "model.text_encoder=tiny-random",
                             "model.encoder_args={patch: 8, temporal_patch: 4}", "model.latent_dim=32"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    items = [{"volume": torch.rand(1, 16, 32, 32, generator=g) * 2 - 1, "text": "", "labels": torch.ones(K) * (i % 2),
              "name": f"train_{i}"} for i in range(6)]
    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    out = embed_images(model, loader, "cpu")
    assert model.training  # the caller's mode is restored
    assert out["image_emb"].shape == (6, 32) and not out["image_emb"].requires_grad
    assert out["names"] == [f"train_{i}" for i in range(6)] and out["labels"][:, 0].tolist() == [0, 1] * 3
    with torch.no_grad():
        expected = model.eval().encode_image(torch.stack([item["volume"] for item in items]))
    torch.testing.assert_close(out["image_emb"], expected, atol=1e-5, rtol=1e-4)
    with autocast_for("bf16", torch.device("cpu")):
        low = embed_images(model, loader, "cpu")["image_emb"]
    assert low.dtype == torch.float32 and not torch.equal(low, out["image_emb"])  # computed in bf16, returned fp32
    cosine = (low * out["image_emb"]).sum(-1)  # unit vectors: the same embeddings up to bf16 rounding
    assert (cosine > 0.95).all(), cosine


def test_probe_settings_keep_the_config_id():
    """The probe reads out a trained model: its settings share the run's checkpoint folder and matrix cell."""
    from core.config import config_id

    base = load_config(None)
    assert config_id(load_config(None, ["eval.probe.lr=0.5", "eval.probe.enabled=false"])) == config_id(base)
    assert config_id(load_config(None, ["eval.bootstrap=10"])) != config_id(base)
