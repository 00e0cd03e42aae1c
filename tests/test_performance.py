"""Performance options change cost, never the result: each leaves a fixed batch's loss (and gradients) as they were.

Tolerances: fp32 reorderings (sdpa backends vs the explicit product, the conv patch embedding vs the Linear
one) agree to 1e-5; bf16 autocast on CPU to 5e-2 relative (bf16 keeps 8 mantissa bits, ~4e-3 per rounding);
torch.compile to 1e-4 relative (Inductor fuses and reorders fp32 reductions).
"""

import pytest
import torch

from core.bench.options import (
    BASELINE,
    MODERN,
    against_modern,
    check_options,
    largest_batch,
    option_configs,
    search_largest,
    verdict,
)
from core.config import load_config
from core.layers.attention import KernelAttention, set_sdpa_backend
from core.model import build_model
from core.registry import ConfigError

MODERN_AXES = ["model.attention=sdpa", "model.mlp=swiglu", "model.norm=rmsnorm"]


def _batch(model, n=4, shape=(16, 32, 32)):
    g = torch.Generator().manual_seed(0)
    volumes = torch.rand(n, 1, *shape, generator=g) * 2 - 1
    volumes[0, :, :8, :16, :16] = -1.0  # air: uniform patches, where a patch norm has nothing to scale
    texts = ["Cardiomegaly is present.", "No pleural effusion.", "A nodule in the right upper lobe.",
             "Emphysema and atelectasis."][:n]
    return volumes, model.tokenize(texts)


def _model(overrides, *extra, state=None):
    torch.manual_seed(0)
    model = build_model(load_config(None, [*overrides, *extra]))
    if state is not None:
        model.load_state_dict(state)
    return model


def _loss_and_grads(model, precision=None):
    volumes, tokens = _batch(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
        loss = model(volumes, **tokens)["loss"]
    loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _randomise_patch_norm(model):
    """Make the patch pre-norm's gain and bias non-trivial, so folding them into the conv is really tested."""
    norm = model.image_encoder.patch_norm_in
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.1)
    return model


# --------------------------------------------------------------------------- sdpa backends


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
def test_sdpa_backends_give_the_standard_attention_loss(tiny_overrides, backend):
    # torch's flash backend takes no additive bias: compare it on CT-ViT without its position bias
    no_bias = ["model.encoder_args.position_bias=none"] if backend == "flash" else []
    standard = _model(tiny_overrides, "model.attention=standard", *no_bias)
    sdpa = _model(tiny_overrides, "model.attention=sdpa", f"model.sdpa_backend={backend}", *no_bias,
                  state=standard.state_dict())
    assert {m.sdpa_backend for m in sdpa.modules() if isinstance(m, KernelAttention)} == {backend}
    loss_std, grads_std = _loss_and_grads(standard)
    loss_sdpa, grads_sdpa = _loss_and_grads(sdpa)
    torch.testing.assert_close(loss_sdpa, loss_std, atol=1e-5, rtol=1e-5)
    for name, grad in grads_std.items():
        torch.testing.assert_close(grads_sdpa[name], grad, atol=1e-5, rtol=1e-4)


def test_sdpa_backend_runs_its_kernel(tiny_overrides):
    """``math`` really swaps the kernel: on CPU torch's default is its flash kernel, math is the plain product."""
    ops = {}
    for backend in ("auto", "math"):
        model = _model(tiny_overrides, f"model.sdpa_backend={backend}")
        volumes, _ = _batch(model)
        with torch.profiler.profile() as prof:
            model.image_encoder(volumes)
        ops[backend] = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops["auto"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in ops["math"]
    assert "aten::_safe_softmax" in ops["math"] or "aten::_softmax" in ops["math"]


def test_unknown_sdpa_backend_names_the_closest():
    with pytest.raises(ConfigError, match=r"model\.sdpa_backend.*did you mean 'flash'"):
        load_config(None, ["model.sdpa_backend=flsh"])
    with pytest.raises(ConfigError, match="did you mean 'efficient'"):
        set_sdpa_backend(torch.nn.Identity(), "eficient")


def test_sdpa_flash_backend_with_a_position_bias_says_what_to_change(tiny_overrides):
    model = _model(tiny_overrides, "model.sdpa_backend=flash")
    volumes, _ = _batch(model)
    with pytest.raises(ConfigError, match="sdpa_backend=flash takes no attention bias.*position_bias=none"):
        model.image_encoder(volumes)


def test_sdpa_backend_without_a_cpu_kernel_says_which_to_use(tiny_overrides):
    model = _model(tiny_overrides, "model.sdpa_backend=efficient")
    volumes, _ = _batch(model)
    with pytest.raises(RuntimeError, match="sdpa_backend=efficient has no cpu kernel.*auto, flash, math"):
        model.image_encoder(volumes)


def test_sdpa_backend_is_set_on_sdpa_layers_only(tiny_overrides):
    model = _model(tiny_overrides, "model.attention=standard")
    assert set_sdpa_backend(model, "math") == 0  # standard attention has no backend to choose
    modern = _model(tiny_overrides)
    layers = [m for m in modern.image_encoder.modules() if isinstance(m, KernelAttention)]
    assert set_sdpa_backend(modern, "math") == len(layers) == 4  # tiny CT-ViT: 2 spatial + 2 temporal blocks


# --------------------------------------------------------------------------- patch embedding


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("randomised", [False, True], ids=["identity-prenorm", "trained-prenorm"])
def test_conv_patch_embedding_equals_the_linear_one(tiny_overrides, norm, randomised):
    """Same parameters, same map: the conv path folds the pre-norm's gain and bias into the conv."""
    linear = _model(tiny_overrides, f"model.norm={norm}")
    if randomised:
        _randomise_patch_norm(linear)
    conv = _model(tiny_overrides, f"model.norm={norm}", "model.encoder_args.patch_embed=conv",
                  state=linear.state_dict())
    volumes, _ = _batch(linear)
    torch.testing.assert_close(conv.image_encoder.embed_patches(volumes),
                               linear.image_encoder.embed_patches(volumes), atol=1e-5, rtol=1e-5)
    loss_lin, grads_lin = _loss_and_grads(linear)
    loss_conv, grads_conv = _loss_and_grads(conv)
    torch.testing.assert_close(loss_conv, loss_lin, atol=1e-5, rtol=1e-5)
    assert grads_conv.keys() == grads_lin.keys()
    for name, grad in grads_lin.items():
        torch.testing.assert_close(grads_conv[name], grad, atol=1e-5, rtol=1e-4)


def _saved_bytes(module, volumes, min_numel=0):
    """Bytes of the distinct tensors of at least ``min_numel`` elements that a forward keeps for its backward,
    the input volume not counted."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != volumes.untyped_storage().data_ptr() and t.numel() >= min_numel:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(volumes)
    return sum(seen.values())


@pytest.mark.parametrize("precision", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_patch_embedding_keeps_one_volume_less(tiny_overrides, precision):
    """Volume-sized tensors kept for backward: the Linear path keeps the patch copy (for its norm) and the normed
    copy (for the Linear), conv only the normed volume; under bf16 autocast the Linear path keeps an fp32 patch
    copy and a bf16 normed one, conv one fp32 normed volume (its conv runs in the input's precision)."""
    volumes = torch.rand(8, 1, 16, 32, 32) * 2 - 1
    kept = {}
    for embed in ("linear", "conv"):
        encoder = _model(tiny_overrides, f"model.encoder_args.patch_embed={embed}").image_encoder
        with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
            kept[embed] = _saved_bytes(encoder.embed_patches, volumes, min_numel=volumes.numel())
    fp32_volume = volumes.numel() * 4
    if precision is None:
        assert kept == {"linear": 2 * fp32_volume, "conv": fp32_volume}
    else:
        assert kept == {"linear": fp32_volume + fp32_volume // 2, "conv": fp32_volume}


@pytest.mark.parametrize("embed", ["linear", "conv"])
def test_grad_checkpointing_keeps_only_block_inputs(tiny_overrides, embed):
    volumes, _ = _batch(_model(tiny_overrides))
    kept = {}
    for checkpointing in (False, True):
        model = _model(tiny_overrides, f"model.encoder_args.patch_embed={embed}",
                       f"model.grad_checkpointing={checkpointing}")
        kept[checkpointing] = _saved_bytes(model.image_encoder, volumes)
    assert kept[True] < kept[False] / 3


# --------------------------------------------------------------------------- precision, checkpointing, compile


def test_bf16_autocast_keeps_the_loss_within_five_percent(tiny_overrides):
    # without vector quantisation: bf16 rounding can move a token to another code, a jump, not a precision loss
    model = _model(tiny_overrides, *MODERN_AXES, "model.encoder_args.patch_embed=conv",
                   "model.encoder_args.codebook_size=0")
    loss32, _ = _loss_and_grads(model)
    loss16, grads16 = _loss_and_grads(model, torch.bfloat16)
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=0)
    assert all(torch.isfinite(g).all() for g in grads16.values())


@pytest.mark.parametrize("encoder", ["ctvit", "hybrid", "vit3d"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_overrides, encoder):
    overrides = [*tiny_overrides, f"model.encoder={encoder}"]
    if encoder != "ctvit":
        overrides += ["model.encoder_args={}", "model.preset=tiny"]
    plain = _model(overrides, *MODERN_AXES)
    checkpointed = _model(overrides, *MODERN_AXES, "model.grad_checkpointing=true", state=plain.state_dict())
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(checkpointed)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_encoder_gives_the_eager_loss(tiny_overrides):
    """torch.compile of the image encoder (the trainer's ``train.compile``), with a chosen sdpa backend inside."""
    eager = _model(tiny_overrides, *MODERN_AXES, "model.sdpa_backend=math", "model.encoder_args.patch_embed=conv",
                   "model.grad_checkpointing=true")
    compiled = _model(tiny_overrides, *MODERN_AXES, "model.sdpa_backend=math", "model.encoder_args.patch_embed=conv",
                      "model.grad_checkpointing=true", state=eager.state_dict())
    compiled.image_encoder = torch.compile(compiled.image_encoder)
    loss_eager, grads_eager = _loss_and_grads(eager)
    loss_compiled, grads_compiled = _loss_and_grads(compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- the options table


def test_option_configs_put_each_option_on_the_modern_row(tiny_overrides):
    configs = option_configs(tiny_overrides, ["bf16", "conv-patch"], extra_baselines=["fp16"])
    assert list(configs) == [BASELINE, f"{BASELINE} fp16", MODERN, f"{MODERN} +bf16", f"{MODERN} +conv-patch",
                             f"{MODERN} +all"]
    base, modern, combined = configs[BASELINE], configs[MODERN], configs[f"{MODERN} +all"]
    # CT-ViT's baseline feed-forward is CT-CLIP's GEGLU (the seed paper's "GELU")
    assert (base.model.encoder, base.model.attention, base.model.norm, base.model.mlp) == (
        "ctvit", "standard", "layernorm", "geglu")
    assert (modern.model.attention, modern.model.norm, modern.model.mlp) == ("sdpa", "rmsnorm", "swiglu")
    assert configs[f"{BASELINE} fp16"].train.precision == "fp16" and base.train.precision == "fp32"
    assert configs[f"{MODERN} +bf16"].train.precision == "bf16"
    assert configs[f"{MODERN} +conv-patch"].model.encoder_args["patch_embed"] == "conv"
    assert combined.train.precision == "bf16" and combined.model.encoder_args["patch_embed"] == "conv"
    assert combined.model.encoder_args["patch"] == 8  # the shared overrides survive


def test_option_baseline_of_an_encoder_without_ctclips_feed_forward_is_gelu():
    base = option_configs(["model.encoder=vit3d", "model.preset=tiny", "data.target_shape=[16, 32, 32]"], ["bf16"])
    assert (base[BASELINE].model.attention, base[BASELINE].model.mlp) == ("standard", "gelu")


def test_unknown_option_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'grad-ckpt'"):
        check_options(["grad-ckp"])


def test_verdict_reads_memory_and_speed_against_a_margin():
    assert verdict(0.5, 1.0) == "memory"
    assert verdict(1.0, 1.2) == "speed"
    assert verdict(0.9, 1.1) == "memory + speed"
    assert verdict(0.99, 1.02) == "no"
    comparison = {"results": {MODERN: {"peak_memory_mb": 100.0, "step_ms": 10.0},
                              f"{MODERN} +x": {"peak_memory_mb": 50.0, "step_ms": 20.0}}}
    assert against_modern(comparison) == {f"{MODERN} +x": {"memory_vs_modern": 0.5, "speedup_vs_modern": 0.5,
                                                           "pays": "memory"}}


def test_largest_batch_search_needs_a_gpu(tiny_overrides):
    from core.bench.model import BenchSubject

    subject = BenchSubject(load_config(None, tiny_overrides), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        largest_batch(subject, 8)


@pytest.mark.parametrize(("capacity", "limit"), [(37, 256), (1, 8), (64, 64), (200, 64), (0, 8), (1000, 1024)])
def test_largest_batch_search_finds_the_capacity_within_a_sixteenth(capacity, limit):
    asked = []

    def fits(batch):
        asked.append(batch)
        return batch <= capacity

    found = search_largest(fits, limit)
    expected = min(capacity, limit)
    assert expected - max(1, expected // 16) <= found <= expected
    assert all(b <= limit for b in asked) and len(asked) <= 2 * max(limit, 2).bit_length()


def test_conv_patch_embedding_counts_the_linear_flops(tiny_overrides):
    """FLOPs are counted on the meta device, where the conv path must run too (it folds one bias: 2·patch·dim)."""
    from core.bench.model import encoder_gflops

    linear = encoder_gflops(load_config(None, tiny_overrides))
    conv = encoder_gflops(load_config(None, [*tiny_overrides, "model.encoder_args.patch_embed=conv"]))
    assert (conv - linear) * 1e9 == pytest.approx(2 * (4 * 8 * 8) * 64, abs=1)
