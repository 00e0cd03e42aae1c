"""CT-ViT as CT-CLIP builds it: its switches, the flash + position-bias rule, the kernels with a bias, and its VQ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from core.config import ModelConfig, config_from_dict
from core.encoders import create_encoder
from core.layers.factorized import PEG, ContinuousPositionBias, QKNormAttention
from core.layers.vq import VectorQuantizer
from core.registry import ConfigError
from experiments.matrix import load_matrix

SHAPE = (16, 32, 32)  # a 4 × 4 × 4 token grid at the tiny preset


def encoder(**args):
    return create_encoder(ModelConfig(preset="tiny", encoder_args=args), SHAPE).eval()


def test_ctclip_preset_is_ctclips_architecture():
    enc = create_encoder(ModelConfig(), (240, 480, 480))
    assert enc.grid == (24, 24, 24) and enc.out_dim == 24 * 24 * 512
    block = enc.spatial.blocks[0]
    assert block.mlp.fc_gate.weight.shape == (1365, 512) and block.mlp.fc_gate.bias is None  # int(4·2/3·512)
    assert block.attn.norm.bias is None and block.attn.proj.bias is None and block.ff_norm.bias is not None
    assert block.attn.kv.weight.shape == (512, 512) and enc.spatial.norm.bias is None
    assert enc.vq.codebook_size == 8192 and len(enc.spatial.blocks) == len(enc.temporal.blocks) == 4
    assert enc.position_bias.net[-1].out_features == 8


@pytest.mark.parametrize("switch", [{"position_bias": "none"}, {"peg": False}, {"qk_norm": False},
                                    {"codebook_size": 0}])
def test_each_switch_changes_the_output(switch):
    torch.manual_seed(0)
    base = encoder()
    variant = encoder(**switch)
    variant.load_state_dict(base.state_dict(), strict=False)  # every weight they share is the same
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        assert not torch.allclose(base(x), variant(x), atol=1e-4)
        assert torch.equal(base(x), base(x))


def test_flash_with_position_bias_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"position_bias=none"):
        create_encoder(ModelConfig(preset="tiny", attention="flash"), SHAPE)


def test_matrix_skips_flash_with_position_bias_and_says_why():
    matrix = load_matrix({
        "name": "pb", "base": {"model": {"encoder": "ctvit", "preset": "tiny", "text_encoder": "tiny-random"},
                               "data": {"target_shape": list(SHAPE)}},
        "axes": {"model.attention": ["sdpa", "flash"], "model.encoder_args.position_bias": ["cpb", "none"]},
    })
    skipped = {(c.config.model.attention, c.config.model.encoder_args["position_bias"]): c.skip_reason
               for c in matrix.cells}
    assert "position_bias=none" in skipped[("flash", "cpb")]
    assert skipped[("sdpa", "cpb")] is None and skipped[("sdpa", "none")] is None and skipped[("flash", "none")] is None


def test_paper_matrix_runs_flash_without_the_position_bias():
    cfg = config_from_dict({"model": {"attention": "flash", "encoder_args": {"position_bias": "none"}}})
    assert cfg.model.encoder_args["position_bias"] == "none"
    matrix = load_matrix("experiments/paper.yaml")
    flash = [c for c in matrix.cells if c.config.model.attention == "flash"]
    assert flash and all(c.config.model.encoder_args.get("position_bias") == "none" for c in flash)
    assert all(c.skip_reason is None or "position_bias" not in c.skip_reason for c in matrix.cells)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_standard_and_sdpa_agree_with_a_bias(qk_norm):
    torch.manual_seed(0)
    std = QKNormAttention(32, 4, 8, "standard", "layernorm", qk_norm)
    sdpa = QKNormAttention(32, 4, 8, "sdpa", "layernorm", qk_norm)
    sdpa.load_state_dict(std.state_dict())
    x, bias = torch.randn(3, 12, 32), torch.randn(4, 12, 12)
    assert torch.allclose(std(x, bias), sdpa(x, bias), atol=1e-5)
    assert not torch.allclose(std(x, bias), std(x), atol=1e-4)


def test_attention_takes_keys_and_values_from_the_unnormed_input():
    torch.manual_seed(0)
    attn = QKNormAttention(16, 2, 8, "standard", "layernorm")
    x = torch.randn(1, 5, 16)
    q = F.normalize(attn.q(attn.norm(x)).view(1, 5, 2, 8).transpose(1, 2), dim=-1) * attn.q_scale
    k, v = attn.kv(x).view(1, 5, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k = F.normalize(k, dim=-1) * attn.k_scale
    ref = ((q @ k.transpose(-1, -2)) * 8).softmax(-1) @ v
    assert torch.allclose(attn(x), attn.proj(ref.transpose(1, 2).reshape(1, 5, 16)), atol=1e-6)


def test_peg_is_causal_along_the_first_grid_axis():
    torch.manual_seed(0)
    peg = PEG(4)
    x = torch.randn(1, 3 * 2 * 2, 4)
    changed = x.clone()
    changed.view(1, 3, 2, 2, 4)[:, 2] += 1.0  # only the last slab
    out, out2 = peg(x, (1, 3, 2, 2)), peg(changed, (1, 3, 2, 2))
    assert torch.equal(out.view(1, 3, 2, 2, 4)[:, :2], out2.view(1, 3, 2, 2, 4)[:, :2])  # earlier slabs unchanged


def test_position_bias_is_a_function_of_signed_log_offsets():
    cpb = ContinuousPositionBias(8, 2)
    bias = cpb(3, 4)
    assert bias.shape == (2, 12, 12)
    # tokens (0,0)→(1,1) and (1,2)→(2,3) share the offset (−1, −1): the same bias
    assert torch.equal(bias[:, 0, 5], bias[:, 6, 11])
    rel = torch.tensor([[-1.0, -1.0]])
    assert torch.allclose(bias[:, 0, 5], cpb.net(torch.sign(rel) * torch.log(rel.abs() + 1))[0])


def test_vq_picks_the_cosine_nearest_row_and_returns_it_raw():
    vq = VectorQuantizer(4, 3).eval()
    vq.embed.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0, 1.0]]))
    x = torch.tensor([[[0.3, 1.0, 0, 0], [5.0, 0.1, 0, 0]]])
    quantized, indices, aux = vq(x)
    assert indices.tolist() == [[1, 0]]  # row 1 by cosine, although row 0 has the larger dot product
    assert torch.equal(quantized[0, 0], vq.embed[1]) and float(aux) == 0.0


def test_vq_training_is_straight_through_with_ema_and_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8).train()
    before = vq.embed.clone()
    x = torch.randn(1, 6, 4, requires_grad=True)
    quantized, indices, aux = vq(x)
    assert torch.allclose(quantized, before[indices], atol=1e-6)  # values: the codebook rows
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # gradient passes straight through
    assert torch.allclose(aux, F.mse_loss(before[indices], x.detach()))
    won = indices.unique()
    for code in won.tolist():
        mean = F.normalize(F.normalize(x.detach()[0][indices[0] == code], dim=-1).mean(0), dim=-1)
        assert torch.allclose(vq.embed[code], torch.lerp(before[code], mean, 0.2), atol=1e-6)
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[won] = False
    assert torch.equal(vq.embed[untouched], before[untouched])


def test_vq_training_step_matches_ctclips_quantiser():
    """One training step against vector-quantize-pytorch 1.1.2 (CT-CLIP's pinned quantiser, fixture made by its
    code) on a codebook of unequal row norms: codes, output, commitment loss, straight-through gradient, and the
    EMA update of every row — including the rows no token won, which move toward their unit-normalised self."""
    step = torch.load(Path(__file__).resolve().parent / "fixtures" / "ctclip" / "vq_train.pt", weights_only=True)
    vq = VectorQuantizer(8, 16).train()
    vq.embed.copy_(step["embed_before"])
    x = step["x"].clone().requires_grad_(True)
    quantized, indices, aux = vq(x)
    (quantized * step["grad_out"]).sum().backward()
    assert torch.equal(indices, step["indices"])
    assert torch.allclose(quantized, step["quantized"], atol=1e-6)
    assert torch.allclose(aux, step["commit_loss"], atol=1e-6)
    assert torch.allclose(x.grad, step["grad_x"], atol=1e-6)
    unwon = torch.ones(16, dtype=torch.bool)
    unwon[indices.unique()] = False
    assert unwon.any() and not torch.allclose(step["embed_after"][unwon], step["embed_before"][unwon])
    assert torch.allclose(vq.embed, step["embed_after"], atol=1e-6)


def test_ctclip_loss_uses_ctclips_unclamped_temperature():
    from core.losses import create_loss

    ctclip, clip = create_loss("ctclip"), create_loss("clip")
    assert float(ctclip.logit_scale) == 1.0 and torch.isclose(ctclip.scale(), torch.tensor(1.0).exp())
    with torch.no_grad():
        ctclip.logit_scale.fill_(6.0)
        clip.logit_scale.fill_(6.0)
    assert torch.isclose(ctclip.scale(), torch.tensor(6.0).exp()) and torch.isclose(clip.scale(), torch.tensor(100.0))
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    logits = torch.tensor(6.0).exp() * image @ text.t()
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.isclose(ctclip(image, text), expected)
