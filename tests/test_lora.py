"""Adaptation modes: which parameters train, what training changes, and LoRA adapter files."""

import logging

import pytest
import torch

from core.config import load_config
from core.lora import apply_adaptation, load_adapter, save_adapter
from core.model import build_model
from core.optim import create_optimizer
from core.registry import ConfigError

BASE = ["model.preset=tiny", "data.target_shape=[16, 32, 32]", "model.text_encoder=tiny-random",
        "model.latent_dim=32", "train.lr=1e-3", "train.warmup_steps=0"]
TEXTS = ["Cardiomegaly is present.", "No pleural effusion.", "A nodule in the right upper lobe.",
         "Emphysema and atelectasis."]


def adapted(encoder: str = "vit3d", adaptation: str = "lora", *overrides: str, seed: int = 0):
    """A freshly built model (weights from ``seed``), adapted; returns (model, cfg, summary)."""
    preset = [] if encoder.startswith("dcformer_") else BASE[:1]
    cfg = load_config(None, [*preset, *BASE[1:], f"model.encoder={encoder}", f"model.adaptation={adaptation}",
                             *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model, cfg, apply_adaptation(model, cfg.model)


def batch(model):
    volumes = torch.rand(4, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return volumes, model.tokenize(TEXTS)


def train(model, cfg, steps: int = 3) -> None:
    """A few AdamW steps as the trainer takes them (its optimizer over the trainable parameters)."""
    optimizer = create_optimizer(model, cfg.train, torch.device("cpu"))
    volumes, tokens = batch(model)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(volumes, **tokens)["loss"].backward()
        optimizer.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@torch.no_grad()
def embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    volumes, tokens = batch(model)
    return model.encode_image(volumes), model.encode_text(**tokens)


def lora_numel(model, rank: int) -> int:
    """r · (in + out) for every layer that carries a LoRA adapter."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    return sum(rank * (m.base_layer.in_features + m.base_layer.out_features) for m in layers)


# ctvit: q, kv (CT-CLIP takes k, v from the un-normed input) and proj of each of its 4 attention layers
@pytest.mark.parametrize(("encoder", "image_layers"), [("vit3d", 4), ("ctvit", 12), ("hybrid", 8)])
def test_lora_makes_only_adapters_and_temperature_trainable(encoder, image_layers):
    model, cfg, summary = adapted(encoder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all("lora_" in n or n.startswith("loss.") for n in trainable), trainable
    assert "loss.logit_scale" in trainable
    image_lora = [m for n, m in model.image_encoder.named_modules() if n.endswith(("qkv", ".q", ".kv", "proj"))
                  and hasattr(m, "lora_A")]
    text_lora = [m for n, m in model.text_encoder.named_modules() if n.endswith(("query", "key", "value"))
                 and hasattr(m, "lora_A")]
    assert len(image_lora) == image_layers  # every attention projection
    assert len(text_lora) == 2 * 3  # query, key, value of the tiny BERT's two layers
    assert summary["params_trainable"] == lora_numel(model, cfg.model.lora_rank) + 1  # + the logit scale
    assert summary["params_total"] == sum(p.numel() for p in model.parameters())
    assert summary["trainable_pct"] == pytest.approx(100 * summary["params_trainable"] / summary["params_total"])
    assert summary["trainable_pct"] < 2.0


def test_lora_training_changes_only_adapter_weights():
    model, cfg, _ = adapted("vit3d", "lora", "model.loss=siglip")
    before = snapshot(model)
    train(model, cfg)
    moved = changed(before, snapshot(model))
    assert all("lora_" in n or n.startswith("loss.") for n in moved), moved
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b and lora_b <= moved  # B starts at zero and must have learned something
    assert {"loss.logit_scale", "loss.logit_bias"} <= moved


def test_lora_adapter_file_reproduces_the_embeddings(tmp_path):
    model, cfg, _ = adapted("vit3d")
    train(model, cfg)
    size = save_adapter(model, tmp_path / "adapter.safetensors")
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert size == (tmp_path / "adapter.safetensors").stat().st_size
    assert size < 0.05 * (tmp_path / "full.pt").stat().st_size
    trained = embeddings(model)

    fresh, _, _ = adapted("vit3d")
    untrained = embeddings(fresh)
    assert not torch.allclose(untrained[0], trained[0]) and not torch.allclose(untrained[1], trained[1])
    assert load_adapter(fresh, tmp_path / "adapter.safetensors") > 0
    for got, want in zip(embeddings(fresh), trained, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(fresh.loss.logit_scale, model.loss.logit_scale)


def test_lora_on_a_conv_encoder_adapts_the_text_side_and_keeps_batchnorm_statistics(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="core.lora"):
        model, cfg, _ = adapted("dcformer_nano")
    assert "text encoder only" in caplog.text and "dcformer_nano" in caplog.text
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert any(p.requires_grad for p in model.text_encoder.parameters())
    train(model, cfg, steps=2)  # train mode: BatchNorm running statistics move
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh, _, _ = adapted("dcformer_nano")
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    for got, want in zip(embeddings(fresh), embeddings(model), strict=True):
        torch.testing.assert_close(got, want)


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ConfigError, match=r"model.lora_image_targets=\['qkvv'\].*did you mean 'qkv'"):
        adapted("vit3d", "lora", "model.lora_image_targets=[qkvv]")
    with pytest.raises(ConfigError, match=r"model.lora_text_targets=\['querry'\].*did you mean 'query'"):
        adapted("vit3d", "lora", "model.lora_text_targets=[querry]")
    with pytest.raises(ConfigError, match="model.lora_rank"):
        adapted("vit3d", "lora", "model.lora_rank=0")


def test_lora_can_target_other_layers_of_a_conv_encoder():
    model, _, _ = adapted("dcformer_nano", "lora", "model.lora_image_targets=[fc1, fc2]")
    adapted_layers = [n for n, m in model.image_encoder.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted_layers) == 2 * 4  # the MLP's two layers in each of the four blocks


def test_adapter_from_a_different_rank_is_refused(tmp_path):
    model, _, _ = adapted("vit3d")
    save_adapter(model, tmp_path / "adapter.safetensors")
    other, _, _ = adapted("vit3d", "lora", "model.lora_rank=4")
    with pytest.raises(ConfigError, match="has shape"):
        load_adapter(other, tmp_path / "adapter.safetensors")
    plain, _, _ = adapted("vit3d", "full")
    with pytest.raises(ConfigError, match="tensors this model lacks"):
        load_adapter(plain, tmp_path / "adapter.safetensors")


def test_frozen_text_trains_everything_but_the_text_tower():
    model, cfg, summary = adapted("vit3d", "frozen_text")
    text = {f"text_encoder.{n}" for n in model.text_encoder.state_dict()}
    assert summary["params_trainable"] == summary["params_total"] - sum(
        p.numel() for p in model.text_encoder.parameters())
    before = snapshot(model)
    train(model, cfg)
    moved = changed(before, snapshot(model))
    assert not moved & text
    assert {"visual_proj.weight", "text_proj.weight", "loss.logit_scale"} <= moved
    assert any(n.startswith("image_encoder.") for n in moved)


def test_full_trains_everything():
    model, _, summary = adapted("vit3d", "full")
    assert summary["params_trainable"] == summary["params_total"]
    assert summary["trainable_pct"] == 100.0
    assert all(p.requires_grad for p in model.parameters())
