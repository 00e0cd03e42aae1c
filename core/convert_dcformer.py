"""DCFormer checkpoint → this suite's CLIP model, with strict key accounting.

``load_dcformer(checkpoint, cfg)`` builds the CLIP model ``cfg`` describes
(its encoder must be one of ``dcformer_nano / naive / tiny``) and fills its
image encoder from one of the authors' files (github.com/mirthAI/DCFormer):

- a ``DecompModel`` state dict: keys ``encoder.*`` and, for the quantiser,
  ``vq.*``;
- a DCFormer CLIP checkpoint (``CTCLIP`` with ``reduction='channel'``, as
  ``main_pretrain.py`` saves it: ``util/misc.py``'s ``save_model`` writes
  ``{"model", "optimizer", "epoch", "scaler", "args"}`` with ``args`` an
  ``argparse.Namespace``, which is let through ``torch.load``'s weights-only
  unpickler; or the ``"model"`` state dict alone): the same keys under
  ``visual_transformer.``, plus ``to_visual_latent.weight`` →
  ``visual_proj.weight``, ``to_text_latent.weight`` → ``text_proj.weight`` and
  ``text_transformer.*`` → the text encoder's transformers model (when
  ``model.text_encoder`` names the same BERT, e.g.
  ``microsoft/BiomedVLP-CXR-BERT-specialized``). The BERT's pooler
  (``pooler.dense.*``, which ``BertModel.from_pretrained`` adds) is dropped:
  DCFormer embeds the text by the last hidden state's CLS token, never the
  pooler output, and our text encoder has no pooler.

What is converted:

- key names: ``s0.0.{i}`` (stem convs) → ``stem.{2i}``; ``s{n}.{j}`` (stage n
  block j) → ``stages.{n-1}.{j+1}``, its ``proj`` (the stage-opening 1×1×1
  conv) → ``stages.{n-1}.0.1``, ``dwconv`` → ``mixer``, ``mlp.mlp.0 / 3`` →
  ``mlp.fc1 / fc2``;
- kernel axes: the authors' encoder permutes its (B, 1, D, H, W) input to
  (B, 1, H, W, D), so its branches c1 / c2 / c3 act on H / W / D; they become
  our ``branches[1] / [2] / [0]`` (which act on H / W / D of our (B, 1, D, H,
  W) input) and each conv weight (O, I, kH, kW, kD) is permuted to
  (O, I, kD, kH, kW). The same input tensor then gives the same features;
- the aliased BatchNorm copies: ``DecompConv3D`` registers each branch's
  BatchNorm twice (``norm.{i}`` and ``c{i+1}.1``); the ``norm.*`` copy is
  checked equal to the other and dropped.

Strict: every tensor of the image encoder (and of each projection named
above) must be filled, with the right shape; any key left over, missing or of
the wrong shape is a ``ConfigError`` naming the keys. DCFormer's temperature
is a constant e, never saved: set ``model.logit_scale_init: 1.0`` and
``model.logit_scale_learnable: false`` (the ``dcformer-*`` presets do).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import Config
from core.model import CLIPModel, build_model
from core.registry import ConfigError

DCFORMER_ENCODERS = ("dcformer_nano", "dcformer_naive", "dcformer_tiny")
BRANCH = {"1": 1, "2": 2, "3": 0}  # the authors' c1 / c2 / c3 (H / W / D) → our branches (D, H, W order)
CLIP_PREFIX = "visual_transformer."
PROJECTIONS = {"to_visual_latent.weight": "visual_proj.weight", "to_text_latent.weight": "text_proj.weight"}
TEXT_PREFIX = "text_transformer."
TEXT_DROPPED = (
    "embeddings.position_ids",  # a non-persistent buffer older transformers saved
    "pooler.dense.weight", "pooler.dense.bias",  # BertModel's pooler: DCFormer pools the CLS hidden state
)


def _rename(key: str) -> str | None:
    """Our encoder key for an authors' ``DecompModel`` key (None when the key is not an encoder tensor)."""
    if key.startswith("vq."):
        return key
    m = re.fullmatch(r"encoder\.s0\.0\.(\d+)\.c([123])\.([01])\.(\w+)", key)
    if m:
        return f"stem.{2 * int(m[1])}.branches.{BRANCH[m[2]]}.{m[3]}.{m[4]}"
    m = re.fullmatch(r"encoder\.s([1-9])\.(\d+)\.(.+)", key)
    if not m:
        return None
    stage, block, rest = int(m[1]) - 1, int(m[2]), m[3]
    if rest == "proj.weight":
        return f"stages.{stage}.0.1.weight" if block == 0 else None
    if rest == "gamma":
        return f"stages.{stage}.{block + 1}.gamma"
    sub = re.fullmatch(r"dwconv\.c([123])\.([01])\.(\w+)", rest)
    if sub:
        return f"stages.{stage}.{block + 1}.mixer.branches.{BRANCH[sub[1]]}.{sub[2]}.{sub[3]}"
    sub = re.fullmatch(r"mlp\.mlp\.([03])\.(weight|bias)", rest)
    if sub:
        return f"stages.{stage}.{block + 1}.mlp.{'fc1' if sub[1] == '0' else 'fc2'}.{sub[2]}"
    return None


def _alias_of(key: str) -> str | None:
    """``...norm.{i}.x`` → ``...c{i+1}.1.x``: the branch key of an aliased BatchNorm copy, else None."""
    if not key.startswith("encoder."):
        return None
    alias = re.sub(r"\.norm\.(\d)\.", lambda m: f".c{int(m[1]) + 1}.1.", key)
    return alias if alias != key else None


def convert_dcformer_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An authors' ``DecompModel`` state dict → our DCFormer encoder's (renamed, permuted, aliases dropped).

    Raises ``ConfigError`` naming keys that are not DCFormer encoder / quantiser
    tensors, and BatchNorm aliases whose two copies differ.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    differing: list[str] = []
    for key, value in state.items():
        alias = _alias_of(key)
        if alias is not None:
            if alias not in state or not torch.equal(state[alias], value):
                differing.append(f"{key} ≠ {alias}")
            continue
        ours = _rename(key)
        if ours is None:
            unknown.append(key)
            continue
        is_branch_conv = ".branches." in ours and ours.endswith(".0.weight")
        out[ours] = value.permute(0, 1, 4, 2, 3).contiguous() if is_branch_conv else value
    if unknown:
        raise ConfigError(f"DCFormer checkpoint: {len(unknown)} keys are not DCFormer encoder or quantiser tensors: "
                          f"{', '.join(unknown[:20])}{' …' if len(unknown) > 20 else ''}")
    if differing:
        raise ConfigError("DCFormer checkpoint: aliased BatchNorm copies differ (or one is missing): "
                          + ", ".join(differing[:20]))
    return out


def _load_checkpoint(checkpoint: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A state dict from a path (``torch.load`` on CPU, tensors and DCFormer's ``args`` only) or as given;
    unwraps ``{"model": ...}``."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"DCFormer checkpoint: no file {path}")
        try:  # main_pretrain.py saves its argparse.Namespace beside the weights: the one non-tensor type let in
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # anything else pickled needs weights_only=False: say so
            raise ConfigError(f"DCFormer checkpoint {path}: cannot be read with torch.load(weights_only=True) "
                              f"({type(err).__name__}: {err}); save its 'model' state dict alone and load that") \
                from None
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    return checkpoint


def _strict_fill(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)``, every key accounted for; a ConfigError naming the keys otherwise."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:20])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:20])}" if unexpected else "",
                 f"wrong shape (checkpoint vs model) {', '.join(wrong[:20])}" if wrong else ""]
        hint = ""
        if any(k.startswith("vq.") for k in missing + unexpected):
            hint = (" — the checkpoint's quantiser and model.encoder_args.codebook_size must agree "
                    "(DCFormer's is 8192; 0 = no quantiser)")
        raise ConfigError(f"DCFormer checkpoint → {what}: {'; '.join(p for p in parts if p)}{hint}")
    module.load_state_dict(state, strict=True)


def load_dcformer(checkpoint: str | Path | Mapping[str, torch.Tensor], cfg: Config) -> CLIPModel:
    """Build ``cfg``'s CLIP model and fill it from a DCFormer checkpoint (path or state dict), strictly.

    ``cfg.model.encoder`` must be a ``dcformer_*`` variant of the checkpoint's
    size, with ``encoder_args.codebook_size`` 8192 when the checkpoint holds
    the quantiser (``vq.*``) and 0 when it does not. Parts the checkpoint does
    not hold (the text tower and projections of a bare ``DecompModel``) keep
    their initialisation.
    """
    if cfg.model.encoder not in DCFORMER_ENCODERS:
        raise ConfigError(f"load_dcformer: model.encoder is '{cfg.model.encoder}'; "
                          f"set it to one of {', '.join(DCFORMER_ENCODERS)}")
    state = dict(_load_checkpoint(checkpoint))
    model = build_model(cfg)
    if any(k.startswith(CLIP_PREFIX) for k in state):
        image = {k.removeprefix(CLIP_PREFIX): state.pop(k) for k in list(state) if k.startswith(CLIP_PREFIX)}
        text = {k.removeprefix(TEXT_PREFIX): state.pop(k) for k in list(state) if k.startswith(TEXT_PREFIX)}
        projections = {PROJECTIONS[k]: state.pop(k) for k in list(state) if k in PROJECTIONS}
        if state:
            raise ConfigError(f"DCFormer CLIP checkpoint: keys outside visual_transformer / text_transformer / "
                              f"to_*_latent: {', '.join(list(state)[:20])}")
        _strict_fill(model.image_encoder, convert_dcformer_state_dict(image), f"image encoder {cfg.model.encoder}")
        if text:
            text = {k: v for k, v in text.items() if k not in TEXT_DROPPED}
            _strict_fill(model.text_encoder.model, text, f"text encoder {cfg.model.text_encoder}")
        for ours, value in projections.items():
            _strict_fill(getattr(model, ours.split(".")[0]), {"weight": value}, ours)
    else:
        _strict_fill(model.image_encoder, convert_dcformer_state_dict(state), f"image encoder {cfg.model.encoder}")
    return model
