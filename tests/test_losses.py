import math

import pytest
import torch
from torch.nn import functional as F

from core.losses import create_loss
from core.registry import ConfigError


def _embeddings(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_formula():
    x, y = _embeddings()
    loss = create_loss("clip")
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    s = 1 / 0.07
    logits = s * x @ y.T
    n = len(x)
    i2t = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(n)) / n
    t2i = -sum(torch.log_softmax(logits[:, j], 0)[j] for j in range(n)) / n
    torch.testing.assert_close(loss(x, y), (i2t + t2i) / 2)


def test_siglip_loss_matches_formula():
    x, y = _embeddings()
    loss = create_loss("siglip")
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss.logit_bias.item() == pytest.approx(-10.0)
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (10.0 * float(x[i] @ y[j]) - 10.0))))
    assert loss(x, y).item() == pytest.approx(total / len(x), rel=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_aligned_pairs_minimise_loss(name):
    x, y = _embeddings()
    loss = create_loss(name)
    assert loss(x, x) < loss(x, y)
    assert loss(x, x) < loss(x, x.roll(1, dims=0))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_logit_parameters_get_finite_gradients(name):
    x, y = _embeddings()
    loss = create_loss(name)
    loss(x, y).backward()
    params = dict(loss.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params.values())
    assert set(params) == ({"logit_scale", "logit_bias"} if name == "siglip" else {"logit_scale"})


def test_ctclip_initial_scale_is_configurable():
    loss = create_loss("clip", logit_scale_init=1.0)
    assert loss.scale().item() == pytest.approx(math.e)


def test_clip_rejects_a_bias():
    with pytest.raises(ConfigError, match="siglip"):
        create_loss("clip", logit_bias_init=-5.0)


def test_unknown_loss_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'siglip'"):
        create_loss("sigclip")


def test_siglip_takes_its_configured_scale_and_bias():
    x, y = _embeddings()
    loss = create_loss("siglip", logit_scale_init=1.0, logit_bias_init=-3.0)
    assert loss.scale().item() == pytest.approx(math.e) and loss.logit_bias.item() == pytest.approx(-3.0)
    total = sum(-math.log(1 / (1 + math.exp(-(1.0 if i == j else -1.0) * (math.e * float(x[i] @ y[j]) - 3.0))))
                for i in range(len(x)) for j in range(len(y)))
    assert loss(x, y).item() == pytest.approx(total / len(x), rel=1e-5)


def test_state_metrics_log_the_temperature_and_bias():
    assert create_loss("clip").state_metrics() == pytest.approx({"logit_scale": 1 / 0.07})
    assert create_loss("siglip", logit_bias_init=-4.0).state_metrics() == pytest.approx(
        {"logit_scale": 10.0, "logit_bias": -4.0})


def test_bias_error_names_the_loss():
    with pytest.raises(ConfigError, match="loss 'ClipLoss' has no bias"):
        create_loss("clip", logit_bias_init=-5.0)


@pytest.mark.parametrize("name", ["clip", "ctclip", "siglip"])
def test_a_fixed_scale_is_a_buffer_that_no_optimizer_trains(name):
    """``logit_scale_learnable: false`` (DCFormer's fixed temperature e): the scale is saved with the model but is
    no parameter, so it gets no gradient and stays at its initial value; the learnable default is a parameter."""
    x, y = (t.requires_grad_() for t in _embeddings())  # the embeddings train, the scale does not
    fixed = create_loss(name, logit_scale_init=1.0, logit_scale_learnable=False)
    assert "logit_scale" not in dict(fixed.named_parameters())
    assert dict(fixed.named_buffers())["logit_scale"].item() == 1.0 and "logit_scale" in fixed.state_dict()
    assert fixed.scale().item() == pytest.approx(math.e)
    fixed(x, y).backward()
    assert not fixed.logit_scale.requires_grad and fixed.logit_scale.grad is None
    assert set(dict(fixed.named_parameters())) == ({"logit_bias"} if name == "siglip" else set())
    learnable = create_loss(name, logit_scale_init=1.0)
    assert "logit_scale" in dict(learnable.named_parameters()) and not dict(learnable.named_buffers())
