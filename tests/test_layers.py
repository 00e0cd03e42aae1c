import importlib.util
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core.layers import TransformerBlock, create_attention, create_mlp, create_norm
from core.layers.attention import KernelAttention, attention_kernel, flash_unavailable_reason
from core.layers.block import Transformer
from core.registry import ConfigError


def test_sdpa_equals_standard_attention():
    torch.manual_seed(1)
    standard = create_attention("standard", dim=48, heads=3, dim_head=16)
    sdpa = create_attention("sdpa", dim=48, heads=3, dim_head=16)
    sdpa.load_state_dict(standard.state_dict())
    x = torch.randn(4, 37, 48)
    torch.testing.assert_close(sdpa(x), standard(x), atol=1e-5, rtol=1e-5)


def test_standard_attention_is_softmax_qk_v():
    attn = create_attention("standard", dim=8, heads=1, dim_head=8)
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    expected = attn.proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v)
    torch.testing.assert_close(attn(x), expected)


def test_multi_head_attention_attends_per_head_then_concatenates():
    """Each head attends over its own slice of q, k, v; the heads' outputs are concatenated in order before the
    output projection. The fused qkv projection has no bias, the output projection has one."""
    attn = create_attention("standard", dim=12, heads=3, dim_head=4)
    assert attn.qkv.bias is None and attn.proj.bias is not None
    assert sum(p.numel() for p in attn.parameters()) == 12 * 3 * 12 + 12 * 12 + 12
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = [torch.softmax(q[..., h * 4:(h + 1) * 4] @ k[..., h * 4:(h + 1) * 4].transpose(1, 2) / 2.0, dim=-1)
             @ v[..., h * 4:(h + 1) * 4] for h in range(3)]
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)))


@pytest.mark.parametrize("name", ["standard", "sdpa"])
def test_kernels_add_the_bias_and_use_the_scale_they_are_given(name):
    """CT-ViT's continuous position bias and its fixed scale 8 reach every kernel (same result as the formula)."""
    layer = KernelAttention(heads=2, dim_head=4, kernel=attention_kernel(name), name=name)
    q, k, v = torch.randn(3, 3, 2, 6, 4).unbind(0)
    bias = torch.randn(1, 2, 6, 6)
    expected = torch.softmax(q @ k.transpose(-2, -1) * 8.0 + bias, dim=-1) @ v
    torch.testing.assert_close(layer.attend(q, k, v, bias=bias, scale=8.0), expected, atol=1e-5, rtol=1e-5)
    default = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v  # no bias, scale 1/sqrt(dim_head)
    torch.testing.assert_close(layer.attend(q, k, v), default, atol=1e-5, rtol=1e-5)


def test_printed_attention_names_its_kernel_and_backend():
    sdpa = create_attention("sdpa", dim=16, heads=2, dim_head=8)
    sdpa.sdpa_backend = "math"
    assert sdpa.extra_repr() == "kernel=sdpa, sdpa_backend=math, heads=2, dim_head=8"
    assert create_attention("standard", dim=16, heads=2, dim_head=8).extra_repr() == (
        "kernel=standard, heads=2, dim_head=8")


def test_flash_unavailable_reason_names_what_is_missing():
    reason = flash_unavailable_reason()
    if importlib.util.find_spec("flash_attn") is None:
        assert reason == "the flash-attn package is not installed (pip install -r requirements-gpu.txt)"
    elif not torch.cuda.is_available():
        assert reason == "flash-attn needs a CUDA GPU and none is available"
    else:
        assert reason is None


@pytest.mark.skipif(flash_unavailable_reason() is None, reason="flash-attn and CUDA are present")
def test_flash_without_cuda_names_sdpa():
    with pytest.raises(ConfigError, match="sdpa") as err:
        create_attention("flash", dim=32, heads=2, dim_head=16)
    assert "flash" in str(err.value)


def test_unknown_attention_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'sdpa'"):
        create_attention("sdp", dim=8, heads=1, dim_head=8)


def test_rmsnorm_matches_formula():
    norm = create_norm("rmsnorm", 16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(3, 7, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_layernorm_matches_formula():
    norm = create_norm("layernorm", 16)
    x = torch.randn(3, 16)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_norm_options_reach_the_layer():
    """CT-CLIP's norms are bias-less LayerNorms (a gain only); eps is the config's, not the default."""
    norm = create_norm("layernorm", 16, eps=1e-2, bias=False)
    assert norm.bias is None and norm.eps == 1e-2
    x = torch.randn(3, 16) * 0.05  # small variance: eps changes the output
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-2)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    assert create_norm("rmsnorm", 16, eps=1e-3).eps == 1e-3


@pytest.mark.parametrize(("name", "act"), [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_mlp_matches_formula(name, act):
    mlp = create_mlp(name, 24)
    x = torch.randn(5, 24)
    hidden = act(x @ mlp.fc_gate.weight.T + mlp.fc_gate.bias) * (x @ mlp.fc_value.weight.T + mlp.fc_value.bias)
    torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_gelu_mlp_matches_formula():
    mlp = create_mlp("gelu", 24)
    x = torch.randn(5, 24)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


@pytest.mark.parametrize("name", ["gelu", "swiglu", "geglu"])
def test_mlp_width_and_bias_follow_the_options(name):
    """Default width 4 · dim (gated: 2/3 of it, rounded up to a multiple of 8), with biases; ``hidden`` and
    ``bias=False`` build CT-CLIP's feed-forward (hidden 1365 at dim 512, no biases)."""
    default = [m for m in create_mlp(name, 24).modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in default[:-1]] == ([96] if name == "gelu" else [64, 64])
    assert default[-1].in_features == default[0].out_features and all(m.bias is not None for m in default)
    ctclip = [m for m in create_mlp(name, 512, hidden=1365, bias=False).modules() if isinstance(m, nn.Linear)]
    assert {m.out_features for m in ctclip[:-1]} == {1365} and ctclip[-1].in_features == 1365
    assert all(m.bias is None for m in ctclip)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_mlp_keeps_gelu_parameter_count(name):
    dim = 512
    gelu = sum(p.numel() for p in create_mlp("gelu", dim).parameters())
    gated = sum(p.numel() for p in create_mlp(name, dim).parameters())
    assert abs(gated - gelu) / gelu < 0.02


@pytest.mark.parametrize("attention", ["standard", "sdpa"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "geglu"])
def test_block_is_pre_norm_residual(attention, norm, mlp):
    block = TransformerBlock(32, heads=2, dim_head=16, attention=attention, norm=norm, mlp=mlp)
    x = torch.randn(2, 9, 32, requires_grad=True)
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_transformer_blocks_take_its_heads_widths_ratio_and_dropout():
    model = Transformer(32, depth=2, heads=2, dim_head=8, attention="sdpa", norm="rmsnorm", mlp="gelu", mlp_ratio=2.0,
                        dropout=0.25)
    assert len(model.blocks) == 2 and isinstance(model.norm, nn.RMSNorm)
    for block in model.blocks:
        assert (block.attn.heads, block.attn.dim_head, block.attn.qkv.out_features) == (2, 8, 3 * 2 * 8)
        assert block.mlp.fc1.out_features == 64 and block.mlp.drop.p == 0.25
        assert isinstance(block.norm1, nn.RMSNorm) and isinstance(block.norm2, nn.RMSNorm)


def test_gradient_checkpointing_recomputes_each_block_and_keeps_the_gradients():
    """Off by default; on, in training with gradients, each block runs again in backward and every parameter
    gets the same gradient (also when the input itself needs none, as a frozen stem's output)."""
    model = Transformer(16, depth=2, heads=2, dim_head=8, attention="sdpa", norm="layernorm", mlp="gelu")
    calls: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 5, 16)

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], len(calls)

    assert model.grad_checkpointing is False
    out, grads, runs = step()
    assert runs == 2
    model.grad_checkpointing = True
    out_ckpt, grads_ckpt, runs_ckpt = step()
    assert runs_ckpt == 4
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(a, b)
    model.eval()
    assert step()[2] == 2  # not training: nothing to save memory for
    model.train()
    calls.clear()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2
