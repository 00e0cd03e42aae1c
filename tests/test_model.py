import itertools

import pytest
import torch

from core.config import load_config
from core.model import build_model, count_parameters
from core.registry import ConfigError

COMBINATIONS = list(itertools.product(["standard", "sdpa"], ["layernorm", "rmsnorm"], ["gelu", "swiglu", "geglu"],
                                      ["clip", "siglip"]))


def _toy_batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    volumes = torch.rand(n, 1, 16, 32, 32, generator=g) * 2 - 1
    texts = ["Cardiomegaly is present.", "No pleural effusion.", "A nodule in the right upper lobe.",
             "Emphysema and atelectasis."][:n]
    return volumes, model.tokenize(texts)


@pytest.mark.parametrize(("attention", "norm", "mlp", "loss"), COMBINATIONS)
def test_every_combination_trains(tiny_overrides, attention, norm, mlp, loss):
    cfg = load_config(None, [*tiny_overrides, f"model.attention={attention}", f"model.norm={norm}",
                             f"model.mlp={mlp}", f"model.loss={loss}"])
    model = build_model(cfg)
    volumes, tokens = _toy_batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        out = model(volumes, **tokens)
        opt.zero_grad()
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(out["loss"].item())
    assert out["image_emb"].shape == (4, 32)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(4))
    assert losses[-1] < losses[0]


def test_ctclip_preset_has_ctclip_shapes():
    """CT-CLIP's CT-ViT at 240×480×480: a 24×24×24 token grid and a 294,912 → 512 bias-free projection."""
    cfg = load_config(None, ["model.text_encoder=tiny-random"])
    with torch.device("meta"):
        model = build_model(cfg)
    enc = model.image_encoder
    assert enc.grid == (24, 24, 24)
    assert enc.out_dim == 294_912
    assert model.visual_proj.weight.shape == (512, 294_912) and model.visual_proj.bias is None
    assert len(enc.spatial.blocks) == 4 and len(enc.temporal.blocks) == 4
    attn = enc.spatial.blocks[0].attn
    assert (attn.heads, attn.dim_head) == (8, 32)


def test_mean_pool_gives_dim_features(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "model.encoder_args={patch: 8, temporal_patch: 4, pool: mean}"])
    model = build_model(cfg)
    assert model.image_encoder.out_dim == 64
    assert model.image_encoder(torch.zeros(2, 1, 16, 32, 32)).shape == (2, 64)


def test_shape_not_divisible_by_patch_is_explained(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "data.target_shape=[15, 32, 32]"])
    with pytest.raises(ConfigError, match="divisible"):
        build_model(cfg)


def test_unknown_encoder_arg_is_named(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "model.encoder_args={dimm: 8}"])
    with pytest.raises(ConfigError, match="did you mean 'dim'"):
        build_model(cfg)


def test_gradient_checkpointing_gives_same_gradients(tiny_overrides):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(load_config(None, [*tiny_overrides, f"model.grad_checkpointing={checkpointing}"]))
        volumes, tokens = _toy_batch(model)
        model(volumes, **tokens)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_parameter_count(tiny_overrides):
    model = build_model(load_config(None, tiny_overrides))
    counts = count_parameters(model)
    assert counts["total"] == counts["trainable"] == sum(p.numel() for p in model.parameters())
