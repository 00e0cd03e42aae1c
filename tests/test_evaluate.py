import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from core.config import EvalConfig, load_config
from core.data import PATHOLOGIES
from core.evaluate import (
    embed_dataset,
    evaluate_zero_shot,
    plot_roc,
    prompt_embeddings,
    zero_shot_scores,
)
from core.model import build_model

OVERRIDES = ["model.preset=tiny", "data.target_shape=[16,32,32]", "model.text_encoder=tiny-random",
             "model.encoder_args={patch: 8, temporal_patch: 4}"]
N_VOLUMES = 12


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, OVERRIDES)
    assert cfg.model.preset == "tiny" and cfg.model.text_encoder == "tiny-random"
    assert cfg.data.target_shape == [16, 32, 32]
    assert cfg.model.encoder_args == {"patch": 8, "temporal_patch": 4}
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.image_encoder.grid == (4, 4, 4)
    return model


def _items(n=N_VOLUMES):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[(i + k) % 3 == 0 for k in range(len(PATHOLOGIES))] for i in range(n)], dtype=torch.float32)
    return [{"volume": torch.rand(1, 16, 32, 32, generator=g) * 2 - 1,
             "text": f"Report {i}: " + ", ".join(p for p, on in zip(PATHOLOGIES, labels[i], strict=True) if on) + ".",
             "labels": labels[i], "name": f"valid_{i}_a_1.nii.gz"} for i in range(n)]


@pytest.fixture(scope="module")
def loader():
    return DataLoader(_items(), batch_size=4)


def test_zero_shot_scores_are_the_pair_softmax():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)
    scores = zero_shot_scores(image, prompts, scale=14.3)
    assert scores.shape == (5, 3) and ((scores > 0) & (scores < 1)).all()
    sims = torch.einsum("nd,kpd->nkp", image, prompts)
    expected = torch.sigmoid(14.3 * (sims[..., 0] - sims[..., 1]))  # 2-way softmax at "present"
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=1e-5)
    swapped = zero_shot_scores(image, prompts.flip(1), scale=14.3)
    np.testing.assert_allclose(scores + swapped, 1.0, rtol=1e-6)  # P(present) + P(not present) = 1
    with pytest.raises(ValueError, match="latent"):
        zero_shot_scores(image, prompts[..., :4], scale=1.0)


def test_prompt_embeddings_are_the_two_prompts_per_pathology(model):
    model.train()
    emb = prompt_embeddings(model, PATHOLOGIES)
    assert model.training, "the model's mode is restored"
    assert emb.shape == (18, 2, model.text_proj.out_features)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(18, 2))
    model.eval()
    with torch.no_grad():
        tokens = model.tokenize(["Cardiomegaly is present.", "Cardiomegaly is not present."])
        direct = model.encode_text(**tokens)
    torch.testing.assert_close(emb[PATHOLOGIES.index("Cardiomegaly")], direct, atol=1e-5, rtol=1e-5)


def test_embed_dataset_keeps_loader_order(model, loader):
    model.train()
    out = embed_dataset(model, loader, "cpu")
    assert model.training
    items = _items()
    assert out["names"] == [item["name"] for item in items]
    np.testing.assert_array_equal(out["labels"], torch.stack([item["labels"] for item in items]).numpy())
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(torch.stack([item["volume"] for item in items[4:8]]))
    torch.testing.assert_close(out["image_emb"][4:8], direct, atol=1e-5, rtol=1e-4)
    assert out["text_emb"].shape == out["image_emb"].shape == (N_VOLUMES, model.text_proj.out_features)


def test_evaluate_zero_shot_returns_the_contract(model, loader, tmp_path):
    cfg = EvalConfig(protocols=["ctclip", "fixed0.5"], bootstrap=200, retrieval_ks=[1, 5, 10, 50])
    result = evaluate_zero_shot(model, loader, cfg, "cpu")
    m = result.metrics
    base = ["zeroshot_auroc", "zeroshot_auprc", "zeroshot_f1", "zeroshot_precision", "zeroshot_recall",
            "zeroshot_accuracy"]
    others = ["zeroshot_f1_fixed0.5", "zeroshot_precision_fixed0.5", "zeroshot_recall_fixed0.5",
              "zeroshot_accuracy_fixed0.5"]
    retrieval = [f"retrieval_{d}_r{k}" for d in ("v2t", "t2v") for k in (1, 5, 10, 50)]
    cis = [f"{key}_ci_{side}" for key in base + others for side in ("low", "high")]
    assert set(m) == set(base + others + retrieval + cis)
    for key in base + others:
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
    assert all(np.isfinite(v) for v in m.values())
    assert m["retrieval_v2t_r50"] == 1.0  # 12 pairs: k clipped to N

    # scores are the pair softmax of this model's embeddings at its own logit scale
    emb = embed_dataset(model, loader, "cpu")
    expected = zero_shot_scores(emb["image_emb"], prompt_embeddings(model), float(model.loss.scale().detach()))
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-7)
    assert result.scores.shape == (N_VOLUMES, 18) and ((result.scores >= 0) & (result.scores <= 1)).all()

    per_label = result.per_label
    assert list(per_label.columns) == ["pathology", "auroc", "auprc", "f1", "precision", "recall", "accuracy",
                                       "threshold", "protocol"]
    assert per_label["protocol"].tolist() == ["ctclip"] * 18 + ["fixed0.5"] * 18
    assert per_label["pathology"].tolist() == list(PATHOLOGIES) * 2
    assert m["zeroshot_auroc"] == pytest.approx(per_label["auroc"][:18].mean())
    assert m["zeroshot_f1_fixed0.5"] == pytest.approx(per_label["f1"][18:].mean())

    preds = result.predictions
    assert list(preds.columns) == ["VolumeName", "pathology", "score", "label"]
    assert len(preds) == N_VOLUMES * 18
    row = preds[(preds.VolumeName == "valid_3_a_1.nii.gz") & (preds.pathology == PATHOLOGIES[5])].iloc[0]
    assert row.score == pytest.approx(result.scores[3, 5]) and row.label == int(result.labels[3, 5])

    written = result.write_artifacts(tmp_path)
    assert [p.name for p in written] == ["zeroshot_per_label.csv", "zeroshot_predictions.csv", "roc.png"]
    pd.testing.assert_frame_equal(pd.read_csv(written[0]), per_label, check_dtype=False)


def test_evaluate_zero_shot_without_bootstrap_has_no_cis(model, loader):
    result = evaluate_zero_shot(model, loader, EvalConfig(protocols=["youden"], bootstrap=0, retrieval_ks=[1]), "cpu")
    assert set(result.metrics) == {"zeroshot_auroc", "zeroshot_auprc", "zeroshot_f1", "zeroshot_precision",
                                   "zeroshot_recall", "zeroshot_accuracy", "retrieval_v2t_r1", "retrieval_t2v_r1"}
    assert (result.per_label["protocol"] == "youden").all()


def test_empty_loader_is_explained(model):
    with pytest.raises(ValueError, match="no batches"):
        embed_dataset(model, [], "cpu")


def test_plot_roc_writes_a_readable_figure(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.4).astype(int)
    labels[:, 3] = 0  # one class only: listed, not drawn
    scores = np.clip(labels * 0.3 + rng.random((60, 4)) * 0.7, 0, 1)
    path = plot_roc(labels, scores, ["Emphysema", "Atelectasis", "Lung nodule", "Hiatal hernia"],
                    tmp_path / "figs" / "roc.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
