"""DCFormer against the authors' code: a fixture their ``DecompModel`` produced, loaded with ``load_dcformer``.

tests/fixtures/dcformer/dcformer.pt was written by make_fixture.py beside it
from github.com/mirthAI/DCFormer (commit recorded in the file): per variant,
the state-dict layout (weights refilled by fill.py's seeded rule), the pooled
encoder features and the VQ-pooled embedding in eval mode, the chosen code
indices, and fvcore's train-mode FLOP count at the fixture's input.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from core.config import load_config
from core.convert_dcformer import convert_dcformer_state_dict, load_dcformer
from core.registry import ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dcformer"
sys.path.insert(0, str(FIXTURES))
from fill import fill_state_dict, input_volume  # noqa: E402

FIXTURE = torch.load(FIXTURES / "dcformer.pt", weights_only=True)
VARIANTS = ("nano", "naive", "tiny")


def dcformer_config(variant: str, *overrides: str):
    shape = ", ".join(map(str, FIXTURE["input_shape"][2:]))
    return load_config(None, [f"model.encoder=dcformer_{variant}", "model.text_encoder=tiny-random",
                              f"data.target_shape=[{shape}]", *overrides])


def authors_state(variant: str, with_vq: bool = True) -> dict[str, torch.Tensor]:
    state = fill_state_dict(FIXTURE["variants"][variant]["layout"])
    return state if with_vq else {k: v for k, v in state.items() if not k.startswith("vq.")}


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    x = input_volume()
    assert float(x.double().sum()) == pytest.approx(FIXTURE["input_sum"], abs=1e-6)  # the fixture's very input
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_pooled_features_equal_the_authors(variant, volume):
    model = load_dcformer(authors_state(variant, with_vq=False), dcformer_config(variant)).eval()
    with torch.no_grad():
        features = model.image_encoder(volume)
    expected = FIXTURE["variants"][variant]["pooled"]
    assert expected.abs().max() > 1.0  # features of a real size, so 1e-5 is a tight bound
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vq_pooled_embedding_equals_the_authors(variant, volume):
    cfg = dcformer_config(variant, "model.encoder_args={codebook_size: 8192}")
    encoder = load_dcformer(authors_state(variant), cfg).image_encoder.eval()
    with torch.no_grad():
        tokens = encoder.forward_features(volume).flatten(2).transpose(1, 2)
        _, indices, _ = encoder.vq(tokens)
        embedding = encoder(volume)
    record = FIXTURE["variants"][variant]
    assert torch.equal(indices, record["vq_indices"])  # no code flips
    torch.testing.assert_close(embedding, record["vq_pooled"], atol=1e-6, rtol=1e-6)
    codebook = encoder.vq._codebook.embed[0]
    torch.testing.assert_close(embedding, codebook[indices].mean(dim=1))  # the mean of the chosen codes


def test_gelu_stem_is_the_ablation_and_changes_the_output(volume):
    """stem_act=gelu puts a GELU after each of the four stem convs; the default (none) is the authors' function."""
    state = authors_state("nano", with_vq=False)
    default = load_dcformer(state, dcformer_config("nano")).image_encoder.eval()
    gelu = load_dcformer(state, dcformer_config("nano", "model.encoder_args={stem_act: gelu}")).image_encoder.eval()
    with torch.no_grad():
        x = volume
        for i in range(4):
            x = F.gelu(default.stem[2 * i](x))
        for stage in default.stages:
            x = stage(x)
        torch.testing.assert_close(gelu(volume), x.mean(dim=(2, 3, 4)), atol=1e-5, rtol=1e-5)
        difference = (gelu(volume) - default(volume)).abs().max()
    assert difference > 0.1


def test_branch_convs_are_permuted_to_our_axis_order():
    """The authors' c1 / c2 / c3 act on H / W / D; ours are listed D, H, W, kernels (k,1,1), (1,k,1), (1,1,k)."""
    state = authors_state("nano", with_vq=False)
    ours = convert_dcformer_state_dict(state)
    c1 = state["encoder.s1.0.dwconv.c1.0.weight"]  # (32, 1, 13, 1, 1): kernel along H
    assert c1.shape == (32, 1, 13, 1, 1)
    torch.testing.assert_close(ours["stages.0.1.mixer.branches.1.0.weight"], c1.reshape(32, 1, 1, 13, 1))
    c3 = state["encoder.s1.0.dwconv.c3.0.weight"]  # kernel along D
    torch.testing.assert_close(ours["stages.0.1.mixer.branches.0.0.weight"], c3.reshape(32, 1, 13, 1, 1))
    assert not any(".norm." in k for k in ours)  # aliased BatchNorm copies dropped


def test_a_dcformer_clip_checkpoint_loads_with_its_projection(tmp_path, volume):
    """CTCLIP's state dict (visual_transformer.*, to_visual_latent) as main_pretrain.py saves it, under "model"."""
    state = {f"visual_transformer.{k}": v for k, v in authors_state("nano").items()}
    projection = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    state["to_visual_latent.weight"] = projection
    path = tmp_path / "checkpoint-14.pth"
    torch.save({"model": state, "epoch": 14}, path)
    model = load_dcformer(path, dcformer_config("nano", "model.encoder_args={codebook_size: 8192}")).eval()
    torch.testing.assert_close(model.visual_proj.weight, projection)
    with torch.no_grad():
        latent = model.encode_image(volume)
    torch.testing.assert_close(latent, F.normalize(FIXTURE["variants"]["nano"]["vq_pooled"] @ projection.t(), dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_a_checkpoint_as_main_pretrain_saves_it_loads_with_its_text_tower(tmp_path, volume):
    """util/misc.py's save_model: {model, optimizer, epoch, scaler, args (an argparse.Namespace)}; the CLIP state
    holds the BERT as BertModel.from_pretrained builds it, pooler included, which DCFormer never uses."""
    from core.text import _tiny_random_model

    torch.manual_seed(0)
    bert = _tiny_random_model().eval()  # a BertModel with its pooler, as DCFormer's text_transformer
    assert bert.pooler is not None
    state = {f"visual_transformer.{k}": v for k, v in authors_state("nano").items()}
    state.update({f"text_transformer.{k}": v for k, v in bert.state_dict().items()})
    image_proj = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    text_proj = torch.randn(512, bert.config.hidden_size, generator=torch.Generator().manual_seed(2))
    state.update({"to_visual_latent.weight": image_proj, "to_text_latent.weight": text_proj})
    args = argparse.Namespace(model="decomp_nano", reduction="channel", input_size=512, batch_size=8, blr=1e-5)
    path = tmp_path / "checkpoint-14.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 14,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    cfg = dcformer_config("nano", "model.encoder_args={codebook_size: 8192}", "model.text_pool=cls")
    model = load_dcformer(path, cfg).eval()
    tokens = model.tokenize(["Left lung nodule.", "No pleural effusion."])
    with torch.no_grad():
        cls = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0][:, 0, :]
        torch.testing.assert_close(model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                                   F.normalize(cls @ text_proj.t(), dim=-1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.encode_image(volume),
                                   F.normalize(FIXTURE["variants"]["nano"]["vq_pooled"] @ image_proj.t(), dim=-1),
                                   atol=1e-5, rtol=1e-5)
    # a pickled object other than DCFormer's args is still refused, with the way out
    torch.save({"model": state, "saved": datetime.date(2025, 2, 7)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="save its 'model' state dict alone"):
        load_dcformer(tmp_path / "other.pth", cfg)


@pytest.mark.parametrize(("edit", "overrides", "message"), [
    (lambda s: s.update({"encoder.s9.0.extra": torch.zeros(1)}), [], "encoder.s9.0.extra"),
    (lambda s: s.pop("encoder.s2.0.gamma"), [], "missing stages.1.1.gamma"),
    (lambda s: s.update({"encoder.s1.0.dwconv.norm.0.weight": torch.zeros(32)}), [], "aliased BatchNorm copies differ"),
    (lambda s: None, [], "codebook_size"),  # the checkpoint has vq.*, the config no quantiser
    (lambda s: None, ["model.encoder=dcformer_naive"], "wrong shape"),
    (lambda s: None, ["model.encoder=convnext3d"], "dcformer_nano, dcformer_naive, dcformer_tiny"),
])
def test_anything_but_an_exact_fit_is_an_error_naming_the_keys(edit, overrides, message):
    state = authors_state("nano")
    edit(state)
    if message != "codebook_size":
        state = {k: v for k, v in state.items() if not k.startswith("vq.")}
    with pytest.raises(ConfigError, match=message):
        load_dcformer(state, dcformer_config("nano", *overrides))


def test_ctlab_convert_dcformer_writes_a_checkpoint_that_computes_the_authors_features(volume, tmp_path):
    from core.checkpoint import load_model_weights
    from core.cli import main
    from core.config import save_config
    from core.model import build_model

    torch.save(authors_state("nano", with_vq=False), tmp_path / "decomp.pt")
    save_config(dcformer_config("nano"), tmp_path / "run.yaml")
    out = tmp_path / "converted"
    assert main(["convert", "dcformer", str(tmp_path / "decomp.pt"), str(tmp_path / "run.yaml"),
                 "--out", str(out)]) == 0
    model = build_model(load_config(out / "config.yaml"))
    load_model_weights(model, out / "model.pt")  # what train.init_from and ctlab eval --checkpoint read
    with torch.no_grad():
        features = model.eval().image_encoder(volume)
    torch.testing.assert_close(features, FIXTURE["variants"]["nano"]["pooled"], atol=1e-5, rtol=1e-5)
    # a checkpoint of another variant fails strictly, naming keys, and writes nothing
    torch.save(authors_state("naive", with_vq=False), tmp_path / "naive.pt")
    assert main(["convert", "dcformer", str(tmp_path / "naive.pt"), str(tmp_path / "run.yaml"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
