"""Every registered image encoder: shapes, gradients, axes, presets; DCFormer against its paper and formulas."""

import pytest
import torch
from torch.nn import functional as F

from core.config import load_config
from core.encoders import create_encoder, encoder_axes
from core.encoders.base import AXES, resolve_axes, unsupported_axes
from core.encoders.dcformer import DecomposedConv3d
from core.registry import ATTENTION, ENCODERS, MLP, NORM, ConfigError

SHAPE = (16, 32, 32)
AXIS_REGISTRIES = {"attention": ATTENTION, "norm": NORM, "mlp": MLP}
NAMES = ENCODERS.names()


def encoder_config(name: str, *overrides: str, shape: tuple[int, int, int] = SHAPE):
    """A model config for encoder ``name`` at its CPU-sized preset (DCFormer variants have only their own)."""
    preset = [] if name.startswith("dcformer_") else ["model.preset=tiny"]
    return load_config(None, [f"model.encoder={name}", *preset, f"data.target_shape={list(shape)}", *overrides]).model


def volumes(n: int = 2, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    return torch.rand(n, 1, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_all_encoders_are_registered():
    assert set(NAMES) >= {"ctvit", "vit3d", "dcformer_nano", "dcformer_naive", "dcformer_tiny", "convnext3d",
                          "poolformer3d", "hybrid"}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    encoder = create_encoder(encoder_config(name), SHAPE)
    out = encoder(volumes())
    assert out.shape == (2, encoder.out_dim)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]), "two different volumes gave the same features"
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in encoder.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"


AXIS_CASES = [(name, axis, value) for name in NAMES for axis in encoder_axes(name)
              for value in AXIS_REGISTRIES[axis].names() if value != "flash"]


@pytest.mark.parametrize(("name", "axis", "value"), AXIS_CASES)
def test_every_axis_value_builds_and_runs(name, axis, value):
    encoder = create_encoder(encoder_config(name, f"model.{axis}={value}"), SHAPE)
    with torch.no_grad():
        out = encoder(volumes())
    assert out.shape == (2, encoder.out_dim) and torch.isfinite(out).all()


def test_axis_values_reach_the_layers():
    """The norm / MLP axes change the layers conv encoders are built from, not just the config."""
    rms = create_encoder(encoder_config("convnext3d", "model.norm=rmsnorm", "model.mlp=swiglu"), SHAPE)
    assert any(isinstance(m, torch.nn.RMSNorm) for m in rms.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rms.modules())
    assert any(type(m).__name__ == "GatedMLP" for m in rms.modules())
    dcf = create_encoder(encoder_config("dcformer_nano", "model.mlp=geglu"), SHAPE)
    assert any(type(m).__name__ == "GatedMLP" for m in dcf.modules())


UNSUPPORTED = [(name, axis) for name in NAMES for axis in AXES if axis not in encoder_axes(name)]


@pytest.mark.parametrize(("name", "axis"), UNSUPPORTED)
def test_unsupported_axis_is_rejected_by_name(name, axis):
    value = AXIS_REGISTRIES[axis].names()[0]
    with pytest.raises(ConfigError, match=f"encoder '{name}' has no {axis} axis"):
        create_encoder(encoder_config(name, f"model.{axis}={value}"), SHAPE)


def test_an_unsupported_axis_says_what_the_encoder_takes_and_what_to_do():
    cfg = encoder_config("convnext3d", "model.attention=sdpa")
    reason = "encoder 'convnext3d' has no attention axis (model.attention=sdpa); it takes: norm, mlp"
    assert unsupported_axes(cfg) == [reason]
    with pytest.raises(ConfigError) as err:
        resolve_axes(cfg)
    assert str(err.value) == f"{reason} — change that key or pick an encoder that takes it"
    both = encoder_config("dcformer_nano", "model.attention=sdpa", "model.norm=rmsnorm")
    with pytest.raises(ConfigError) as err:
        resolve_axes(both)
    assert str(err.value).split("; it takes: mlp; ") == [
        "encoder 'dcformer_nano' has no attention axis (model.attention=sdpa)",
        "encoder 'dcformer_nano' has no norm axis (model.norm=rmsnorm); it takes: mlp — change that key or pick an "
        "encoder that takes it"]


def test_an_encoders_own_conflicts_see_the_resolved_axes():
    """CT-ViT cannot run flash with its position bias: the config's attention (or the default) is what is checked."""
    flash = encoder_config("ctvit", "model.attention=flash")
    [reason] = unsupported_axes(flash)
    assert reason.startswith("model.attention=flash cannot add CT-ViT's continuous position bias")
    assert unsupported_axes(encoder_config("ctvit", "model.attention=flash",
                                           "model.encoder_args={position_bias: none}")) == []
    assert unsupported_axes(encoder_config("ctvit", "model.attention=standard")) == []
    assert resolve_axes(encoder_config("ctvit", "model.mlp=swiglu")) == {"attention": "sdpa", "norm": "layernorm",
                                                                          "mlp": "swiglu"}


def test_a_misspelt_preset_or_encoder_arg_names_the_closest():
    with pytest.raises(ConfigError) as err:
        create_encoder(encoder_config("vit3d", "model.preset=tinny"), SHAPE)
    assert str(err.value) == "model.preset: encoder 'vit3d' has no preset 'tinny'; did you mean 'tiny'? " \
                             "(choices: tiny, base)"
    with pytest.raises(ConfigError) as err:
        create_encoder(encoder_config("vit3d", "model.encoder_args={dimm: 8}"), SHAPE)
    assert str(err.value).startswith("unknown config key 'model.encoder_args.dimm'; did you mean 'dim'? ")
    assert str(err.value).endswith("[encoder 'vit3d']")


def test_declared_axes():
    assert encoder_axes("dcformer_nano") == {"mlp": "gelu"}
    assert set(encoder_axes("convnext3d")) == set(encoder_axes("poolformer3d")) == {"norm", "mlp"}
    assert set(encoder_axes("vit3d")) == set(encoder_axes("hybrid")) == {"attention", "norm", "mlp"}


@pytest.mark.parametrize("name", ["vit3d", "hybrid", "convnext3d", "poolformer3d", "dcformer_nano"])
def test_gradient_checkpointing_gives_same_gradients(name):
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        encoder = create_encoder(encoder_config(name), SHAPE)
        encoder.set_grad_checkpointing(enable)
        out = encoder(volumes())
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({n: p.grad for n, p in encoder.named_parameters()})
    for pname, grad in grads[0].items():
        torch.testing.assert_close(grads[1][pname], grad, atol=1e-6, rtol=1e-5, msg=f"{name}: {pname}")


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("vit3d", ["model.encoder_args={patch: 5}"], "divisible by the vit3d patch 5"),
    ("hybrid", ["model.encoder_args={slab: 3}"], "divisible by the hybrid slab 3"),
    ("convnext3d", ["model.preset=base"], "too small for convnext3d"),
    ("dcformer_nano", ["model.preset=tiny"], "has no preset 'tiny'"),
    ("dcformer_tiny", ["model.encoder_args={depths: [1, 1]}"], "len\\(widths\\) = len\\(depths\\) \\+ 1"),
])
def test_bad_shapes_and_presets_are_explained(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_encoder(encoder_config(name, *overrides), SHAPE)


@pytest.mark.parametrize(("name", "shape", "out_dim"), [
    ("convnext3d", (32, 64, 64), 768), ("poolformer3d", (32, 64, 64), 512), ("vit3d", (32, 64, 64), 768),
    ("hybrid", (16, 64, 64), 512),
])
def test_base_presets_build_and_run(name, shape, out_dim):
    encoder = create_encoder(encoder_config(name, "model.preset=base", shape=shape), shape)
    with torch.no_grad():
        assert encoder(volumes(1, shape)).shape == (1, out_dim)


# --------------------------------------------------------------------------- DCFormer


def dcformer_params(depths, widths, kernels=(13, 11, 9, 7), ratio=4):
    """DCFormer's parameter count in closed form, layer by layer as the authors' release builds it."""

    def decomposed(c_in, c_out, k, groups):  # three convs (weight + bias) and three BatchNorms (gain + bias)
        return 3 * (c_out * (c_in // groups) * k + c_out + 2 * c_out)

    w0 = widths[0]
    total = decomposed(1, w0, 7, 1) + 3 * decomposed(w0, w0, 3, 1)  # stem: k7 stride 4, then three 3×3×3
    for depth, k, c_in, c in zip(depths, kernels, widths, widths[1:], strict=False):
        hidden = ratio * c
        block = decomposed(c, c, k, c) + (c * hidden + hidden) + (hidden * c + c) + c  # mixer, MLP, layer scale
        total += c_in * c + depth * block  # bias-free 1×1×1 conv opening the stage
    return total


PAPER = [  # DCFormer paper, Table 1: params (M) of the image tower
    ("dcformer_nano", [1, 1, 1, 1], [32, 32, 64, 128, 256], 0.92),
    ("dcformer_naive", [2, 2, 2, 2], [32, 64, 128, 256, 512], 5.85),
    ("dcformer_tiny", [2, 3, 3, 2], [64, 96, 192, 384, 768], 15.1),
]


@pytest.mark.parametrize(("name", "depths", "widths", "paper_m"), PAPER)
def test_dcformer_parameter_counts_match_the_paper(name, depths, widths, paper_m):
    with torch.device("meta"):
        encoder = create_encoder(encoder_config(name), (256, 512, 512))
    params = sum(p.numel() for p in encoder.parameters())
    assert params == dcformer_params(depths, widths)
    with_latent = params + encoder.out_dim * 512  # + the bias-free projection to the 512-d CLIP latent
    assert abs(with_latent / 1e6 - paper_m) / paper_m < 0.10, (name, params, with_latent)


def test_dcformer_layout_follows_the_paper():
    encoder = create_encoder(encoder_config("dcformer_tiny"), SHAPE)
    for stage, kernel, width in zip(encoder.stages, (13, 11, 9, 7), (96, 192, 384, 768), strict=True):
        pool, conv = stage[0]
        assert isinstance(pool, torch.nn.MaxPool3d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
        assert conv.kernel_size == (1, 1, 1) and conv.bias is None and conv.out_channels == width
        for block in stage[1:]:
            shapes = [branch[0].kernel_size for branch in block.mixer.branches]
            assert shapes == [(kernel, 1, 1), (1, kernel, 1), (1, 1, kernel)]
            assert all(branch[0].groups == width for branch in block.mixer.branches)
            torch.testing.assert_close(block.gamma, torch.full((width,), 1e-6))
    with torch.device("meta"):
        features = encoder.to("meta").forward_features(torch.empty(1, 1, 256, 512, 512))
    assert features.shape == (1, 768, 4, 8, 8)  # total stride 64


def _randomise_batchnorm(module):
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm3d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "groups"), [(4, 4, 5, 1, 4), (2, 6, 7, 4, 1)])
def test_decomposed_conv_is_the_sum_of_its_three_branches(c_in, c_out, kernel, stride, groups):
    conv = DecomposedConv3d(c_in, c_out, kernel, stride=stride, groups=groups)
    _randomise_batchnorm(conv)
    conv.eval()
    x = torch.randn(2, c_in, 9, 10, 11)
    expected = 0
    for axis, (branch_conv, bn) in enumerate(conv.branches):
        padding = [0, 0, 0]
        padding[axis] = kernel // 2
        y = F.conv3d(x, branch_conv.weight, branch_conv.bias, stride=stride, padding=padding, groups=groups)
        shape = (1, -1, 1, 1, 1)
        expected = expected + (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) \
            * bn.weight.view(shape) + bn.bias.view(shape)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_decomposed_depthwise_conv_equals_a_cross_shaped_3d_kernel():
    """In eval mode the three branches fold into one k×k×k depthwise conv that is non-zero on three lines."""
    channels, k = 3, 5
    conv = DecomposedConv3d(channels, channels, k, groups=channels)
    _randomise_batchnorm(conv)
    conv.eval()
    weight = torch.zeros(channels, 1, k, k, k)
    bias = torch.zeros(channels)
    for branch_conv, bn in conv.branches:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        line = branch_conv.weight * scale.view(-1, 1, 1, 1, 1)
        starts = [(k - s) // 2 for s in line.shape[2:]]
        weight[:, :, starts[0]:starts[0] + line.shape[2], starts[1]:starts[1] + line.shape[3],
               starts[2]:starts[2] + line.shape[4]] += line
        bias += scale * (branch_conv.bias - bn.running_mean) + bn.bias
    x = torch.randn(2, channels, 7, 8, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv3d(x, weight, bias, padding=k // 2, groups=channels),
                                   atol=1e-5, rtol=1e-5)
