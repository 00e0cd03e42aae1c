"""CT-CLIP checkpoint → this model: parity with CT-CLIP's own outputs, strict key accounting, CLI, init_from.

The fixture (tests/fixtures/ctclip, made by make_fixture.py running CT-CLIP's
code) is a small CT-CLIP — dim 64, a 6 × 4 × 4 token grid, depth 2 + 2,
codebook 512, a 2-layer BERT — with its state_dict and its outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from core.config import config_from_dict
from core.convert import UNUSED, convert_state_dict, load_ctclip
from core.registry import ConfigError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ctclip"
CHECKPOINT = FIXTURE / "ctclip_small.pt"
TOL = 1e-5


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """The fixture's BERT folder (config + tokenizer) with placeholder weights, as a hub folder would have."""
    folder = tmp_path_factory.mktemp("bert") / "bert"
    shutil.copytree(FIXTURE / "bert", folder)
    torch.manual_seed(1)
    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def small_config(bert: Path, **model: object):
    """The fixture's architecture: our ``tiny`` ctvit preset is exactly it."""
    return config_from_dict({
        "model": {"encoder": "ctvit", "preset": "tiny", "attention": "standard", "text_encoder": str(bert),
                  "latent_dim": 32, "loss": "ctclip", "text_max_length": 64, **model},
        "data": {"target_shape": [24, 32, 32]},
    })


def outputs(model, expected: dict) -> dict[str, torch.Tensor]:
    model.eval()
    encoder = model.image_encoder
    with torch.no_grad():
        vq, encoder.vq = encoder.vq, None
        tokens = encoder.forward_tokens(expected["volumes"])
        encoder.vq = vq
        indices = vq(tokens.flatten(1, 3))[1]
        image = model.encode_image(expected["volumes"])
        text = model.encode_text(expected["input_ids"], expected["attention_mask"])
    return {"tokens": tokens, "indices": indices, "image": image, "text": text,
            "similarity": (image * text).sum(-1) * model.loss.scale()}


def test_standard_kernel_reproduces_ctclip(bert_folder, expected):
    got = outputs(load_ctclip(CHECKPOINT, small_config(bert_folder)), expected)
    assert (got["tokens"] - expected["encoded_tokens"]).abs().max() < TOL  # before quantisation
    assert torch.equal(got["indices"], expected["indices"].flatten(1))  # every code as CT-CLIP picks it
    assert (got["image"] - expected["image_latents"]).abs().max() < TOL
    assert (got["text"] - expected["text_latents"]).abs().max() < TOL
    assert torch.allclose(got["similarity"], expected["similarity"], atol=TOL)  # temperature: exp(0.7)


def test_sdpa_kernel_reproduces_ctclip(bert_folder, expected):
    got = outputs(load_ctclip(CHECKPOINT, small_config(bert_folder, attention="sdpa")), expected)
    assert (got["tokens"] - expected["encoded_tokens"]).abs().max() < TOL
    flips = int((got["indices"] != expected["indices"].flatten(1)).sum())
    assert flips == 0, f"{flips} codebook choices flipped at a near-tie"
    assert (got["image"] - expected["image_latents"]).abs().max() < TOL


def test_key_accounting_maps_or_explains_every_key(bert_folder):
    state = torch.load(CHECKPOINT, weights_only=True)
    model = load_ctclip(state, small_config(bert_folder))
    acc = model.ctclip_accounting
    assert set(acc.mapped) | set(acc.unused) == set(state) and not set(acc.mapped) & set(acc.unused)
    filled = {name for names in acc.mapped.values() for name in names}
    assert filled == set(model.state_dict())  # every tensor of the model comes from the checkpoint
    assert {k for k in acc.unused if "to_pixels" in k or "latent_extra" in k or "pooler" in k}
    assert all(acc.unused[k] in UNUSED.values() for k in acc.unused)


def test_unknown_checkpoint_key_fails_naming_it(bert_folder):
    state = dict(torch.load(CHECKPOINT, weights_only=True))
    state["visual_transformer.enc_spatial_transformer.layers.0.1.to_qk.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"no place for \(1\): visual_transformer\.enc_spatial_transformer"
                                          r"\.layers\.0\.1\.to_qk\.weight"):
        load_ctclip(state, small_config(bert_folder))


def test_missing_checkpoint_key_fails_naming_the_model_tensor(bert_folder):
    state = dict(torch.load(CHECKPOINT, weights_only=True))
    del state["visual_transformer.enc_temporal_transformer.layers.1.1.to_kv.weight"]
    with pytest.raises(ConfigError, match=r"does not fill \(1\): image_encoder\.temporal\.blocks\.1\.attn\.kv\.weight"):
        load_ctclip(state, small_config(bert_folder))


def test_nonzero_bias_of_a_biasless_norm_is_not_silently_dropped(bert_folder):
    state = dict(torch.load(CHECKPOINT, weights_only=True))
    state["visual_transformer.enc_spatial_transformer.norm_out.beta"] = torch.ones(64)
    with pytest.raises(ConfigError, match="norm_out.beta.*not zero"):
        load_ctclip(state, small_config(bert_folder))


def test_switched_architecture_does_not_load(bert_folder):
    with pytest.raises(ConfigError, match=r"spatial_rel_pos_bias.*position_bias\.net"):
        load_ctclip(CHECKPOINT, small_config(bert_folder, encoder_args={"position_bias": "none"}))
    with pytest.raises(ConfigError, match=r"shapes that differ.*to_visual_latent"):
        load_ctclip(CHECKPOINT, small_config(bert_folder, latent_dim=16))


def test_documented_unused_keys_are_accepted_and_only_those(bert_folder):
    state = torch.load(CHECKPOINT, weights_only=True)
    target = load_ctclip(state, small_config(bert_folder)).state_dict()
    kept = {k: v for k, v in state.items() if "to_pixels" not in k and "first_frame" not in k}
    _, acc = convert_state_dict(kept, target)  # dropping unused keys changes nothing
    assert not acc.unknown and not acc.missing and not acc.mismatched


def test_checkpoint_is_read_without_unpickling_code(tmp_path, bert_folder):
    path = tmp_path / "evil.pt"
    torch.save({"temperature": torch.tensor(1.0), "hook": Path("x")}, path)  # an arbitrary object inside
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|state_dict"):
        load_ctclip(path, small_config(bert_folder))


def released_target(bert_config) -> dict[str, torch.Tensor]:
    """This model's state_dict at the ``ctclip`` preset with a BERT-base text tower, on the meta device."""
    from transformers import BertModel

    from core.encoders import create_encoder
    from core.losses import create_loss

    with torch.device("meta"):
        image = create_encoder(config_from_dict({}).model, (240, 480, 480))
        text = BertModel(bert_config, add_pooling_layer=False)
        target = {f"image_encoder.{k}": v for k, v in image.state_dict().items()}
        target |= {f"text_encoder.model.{k}": v for k, v in text.state_dict().items()}
        target |= {"visual_proj.weight": torch.empty(512, image.out_dim), "text_proj.weight": torch.empty(512, 768),
                   **{f"loss.{k}": v for k, v in create_loss("ctclip").state_dict().items()}}
    return target


def test_released_ctclip_layout_loads_completely():
    """Every key of CT-CLIP's released state_dict (names and shapes its code builds) is mapped or documented, and
    every tensor of the ``ctclip`` preset is filled, in the right shape."""
    from transformers import BertConfig

    released = {k: torch.empty(shape, device="meta")
                for k, shape in __import__("json").loads((FIXTURE / "released_keys.json").read_text()).items()}
    target = released_target(BertConfig(vocab_size=30522))  # CXR-BERT is a BERT-base
    _, acc = convert_state_dict(released, target)
    assert not acc.unknown and not acc.missing and not acc.mismatched
    assert (len(acc.mapped), len(acc.unused)) == (311, 51)
    assert sum(t.numel() for k, t in target.items() if k.startswith("image_encoder.") and "vq." not in k) == 23_421_768


# --------------------------------------------------------------------------- CLI and init_from (end to end)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bert_folder) -> tuple[Path, Path]:
    """``ctlab convert ctclip`` of the fixture into a folder, with a synthetic CT-RATE for the run config."""
    from core.cli import main
    from core.config import save_config

    tmp = tmp_path_factory.mktemp("convert")
    assert main(["data", "synth", "--out", str(tmp / "root"), "--train", "8", "--valid", "8", "--seed", "1"]) == 0
    cfg = small_config(bert_folder)
    cfg.data.root, cfg.data.cache_dir = str(tmp / "root"), str(tmp / "cache")
    cfg.data.target_spacing = [10.0, 9.0, 9.0]
    cfg.train.output_dir, cfg.tracking.uri = str(tmp / "runs"), f"sqlite:///{tmp}/mlflow.db"
    cfg.eval.bootstrap, cfg.eval.batch_size, cfg.train.batch_size = 20, 4, 4
    save_config(cfg, tmp / "run.yaml")
    out = tmp / "converted"
    assert main(["convert", "ctclip", str(CHECKPOINT), str(tmp / "run.yaml"), "--out", str(out)]) == 0
    return out, tmp


@pytest.mark.slow
def test_convert_then_eval_end_to_end(converted, expected):
    from core.checkpoint import load_checkpoint
    from core.cli import main
    from core.config import load_config
    from core.model import build_model

    out, tmp = converted
    keys = __import__("json").loads((out / "keys.json").read_text())
    assert len(keys["mapped"]) + len(keys["unused"]) == len(torch.load(CHECKPOINT, weights_only=True))
    model = build_model(load_config(out / "config.yaml"))  # the written config + checkpoint are CT-CLIP's model
    model.load_state_dict(load_checkpoint(out / "model.pt")["model"])
    with torch.no_grad():
        image = model.eval().encode_image(expected["volumes"])
    assert (image - expected["image_latents"]).abs().max() < TOL
    assert main(["eval", str(out / "config.yaml"), "--checkpoint", str(out / "model.pt"), "--out",
                 str(tmp / "eval"), "--no-progress"]) == 0
    per_label = (tmp / "eval" / "zeroshot_per_label.csv").read_text().splitlines()
    assert len(per_label) >= 19  # a header and the 18 pathologies


@pytest.mark.slow
def test_init_from_with_lora_trains_only_the_adapters(converted):
    from core.checkpoint import load_checkpoint
    from core.config import load_config
    from core.train import train

    out, _ = converted
    cfg = load_config(out / "config.yaml", [f"train.init_from={out / 'model.pt'}", "model.adaptation=lora",
                                            "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=0",
                                            "eval.every_epoch=false"])
    result = train(cfg)
    start = load_checkpoint(out / "model.pt")["model"]
    final = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]
    lora_b = [v for k, v in final.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().max() > 0) for v in lora_b)  # the adapters moved off their zero init
    frozen = {k.replace(".base_layer", ""): v for k, v in final.items() if "lora_" not in k}
    params = {k for k, _ in __import__("core.model", fromlist=["build_model"]).build_model(cfg).named_parameters()}
    for name in params - {"loss.logit_scale"}:
        assert torch.equal(frozen[name], start[name]), name  # every pretrained weight as converted
    assert any(k.startswith("image_encoder.spatial.blocks.0.attn.q.lora_A") for k in final)


def test_init_from_a_checkpoint_of_another_architecture_fails_naming_it(tmp_path, bert_folder):
    from core.checkpoint import load_model_weights
    from core.model import build_model

    path = tmp_path / "model.pt"
    torch.save({"model": load_ctclip(CHECKPOINT, small_config(bert_folder)).state_dict()}, path)
    model = build_model(small_config(bert_folder, latent_dim=16))
    with pytest.raises(ConfigError, match=r"train.init_from=.*model.pt: the checkpoint does not fit.*visual_proj"):
        load_model_weights(model, path)
    load_model_weights(build_model(small_config(bert_folder)), path)  # the same architecture loads


def test_init_from_a_missing_file_or_an_unconverted_ctclip_checkpoint_fails_naming_the_converter(tmp_path,
                                                                                                   bert_folder):
    from core.checkpoint import load_model_weights
    from core.model import build_model

    model = build_model(small_config(bert_folder))
    with pytest.raises(ConfigError, match=r"train.init_from=.*nope.pt: no such file; .*ctlab convert"):
        load_model_weights(model, tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match=r"train.init_from=.*ctclip_small.pt: not a checkpoint of this suite.*"
                                          r"ctlab convert ctclip"):
        load_model_weights(model, CHECKPOINT)  # CT-CLIP's own state_dict, not converted
