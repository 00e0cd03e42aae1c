"""CT-CLIP checkpoint → this model, with strict key accounting.

``load_ctclip(checkpoint, cfg)`` builds the CLIP model ``cfg`` describes (a
``ctvit`` image encoder; the text encoder a BERT folder of the checkpoint's
text tower, e.g. CXR-BERT) and fills every one of its tensors from a CT-CLIP
``state_dict`` (``CT-CLIP_v2.pt``). Each checkpoint key is either mapped by
``RULES`` or listed in ``UNUSED`` with the reason CT-CLIP itself never uses
it; anything else — or a model tensor nothing fills, or a shape that does
not fit — is a ``ConfigError`` listing the keys. Files are read with
``torch.load(weights_only=True)`` (tensors only, no pickled code).

The mapping, CT-CLIP → here: ``visual_transformer.to_patch_emb.{1,2,3}`` →
``image_encoder.patch_norm_in / patch_proj / patch_norm_out``;
``spatial_rel_pos_bias.net`` → ``image_encoder.position_bias.net``;
``enc_{spatial,temporal}_transformer.layers.i.{0,1,3}`` (PEG, attention,
feed-forward) → ``image_encoder.{spatial,temporal}.blocks.i.{peg, attn,
ff_norm + mlp}`` — the feed-forward's fused ``Linear(dim, 2·hidden)`` splits
into GEGLU's value (first half) and gate (second half); ``norm_out.gamma`` →
``.norm.weight``; ``vq._codebook.embed`` → ``image_encoder.vq.embed``;
``to_visual_latent`` / ``to_text_latent`` → ``visual_proj`` / ``text_proj``;
``temperature`` → ``loss.logit_scale`` (use ``model.loss=ctclip``: CT-CLIP's
unclamped exp); ``text_transformer.*`` → ``text_encoder.model.*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.config import Config
from core.model import CLIPModel, build_model
from core.registry import ConfigError

_STACK = r"visual_transformer\.enc_(spatial|temporal)_transformer"
_LAYER = _STACK + r"\.layers\.(\d+)"
_OURS = r"image_encoder.\1"
_BLOCK = r"image_encoder.\1.blocks.\2"


def _split_geglu(target_value: str, target_gate: str) -> Callable[[re.Match, torch.Tensor], dict[str, torch.Tensor]]:
    """CT-CLIP's fused GEGLU input Linear (2·hidden, dim): first half the value, second half the gate."""
    def split(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        value, gate = tensor.chunk(2, dim=0)
        return {match.expand(target_value): value, match.expand(target_gate): gate}
    return split


def _rename(target: str, transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
    def rename(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {match.expand(target): transform(tensor)}
    return rename


# CT-CLIP key pattern → how it fills this model's tensors.
RULES: list[tuple[str, Callable[[re.Match, torch.Tensor], dict[str, torch.Tensor]]]] = [
    (r"temperature", _rename("loss.logit_scale")),
    (r"to_visual_latent\.weight", _rename("visual_proj.weight")),
    (r"to_text_latent\.weight", _rename("text_proj.weight")),
    (r"visual_transformer\.to_patch_emb\.1\.(weight|bias)", _rename(r"image_encoder.patch_norm_in.\1")),
    (r"visual_transformer\.to_patch_emb\.2\.(weight|bias)", _rename(r"image_encoder.patch_proj.\1")),
    (r"visual_transformer\.to_patch_emb\.3\.(weight|bias)", _rename(r"image_encoder.patch_norm_out.\1")),
    (r"visual_transformer\.spatial_rel_pos_bias\.net\.0\.0\.(weight|bias)",
     _rename(r"image_encoder.position_bias.net.0.\1")),
    (r"visual_transformer\.spatial_rel_pos_bias\.net\.1\.0\.(weight|bias)",
     _rename(r"image_encoder.position_bias.net.2.\1")),
    (r"visual_transformer\.spatial_rel_pos_bias\.net\.2\.(weight|bias)",
     _rename(r"image_encoder.position_bias.net.4.\1")),
    (_LAYER + r"\.0\.dsconv\.(weight|bias)", _rename(_BLOCK + r".peg.conv.\3")),
    (_LAYER + r"\.1\.(q_scale|k_scale)", _rename(_BLOCK + r".attn.\3")),
    (_LAYER + r"\.1\.norm\.gamma", _rename(_BLOCK + ".attn.norm.weight")),
    (_LAYER + r"\.1\.to_q\.weight", _rename(_BLOCK + ".attn.q.weight")),
    (_LAYER + r"\.1\.to_kv\.weight", _rename(_BLOCK + ".attn.kv.weight")),
    (_LAYER + r"\.1\.to_out\.weight", _rename(_BLOCK + ".attn.proj.weight")),
    (_LAYER + r"\.3\.0\.(weight|bias)", _rename(_BLOCK + r".ff_norm.\3")),
    (_LAYER + r"\.3\.1\.weight", _split_geglu(_BLOCK + ".mlp.fc_value.weight", _BLOCK + ".mlp.fc_gate.weight")),
    (_LAYER + r"\.3\.4\.weight", _rename(_BLOCK + ".mlp.fc2.weight")),
    (_STACK + r"\.norm_out\.gamma", _rename(_OURS + ".norm.weight")),
    (r"visual_transformer\.vq\._codebook\.embed", _rename("image_encoder.vq.embed", lambda t: t.squeeze(0))),
    (r"text_transformer\.(?!pooler\.|embeddings\.position_ids$)(.*)", _rename(r"text_encoder.model.\1")),
]

# CT-CLIP key pattern → why CT-CLIP's own forward never reads it.
UNUSED: dict[str, str] = {
    r"to_(text|visual)_latent_extra\.weight": "CLOOB's extra projections; CT-CLIP runs with "
                                              "extra_latent_projection=False",
    r"visual_transformer\.to_patch_emb_first_frame\..*": "first-frame patch embedding; commented out in CTViT.forward",
    r"visual_transformer\.to_pixels(_first_frame)?\..*": "the VQ-VAE decoder head; CLIP asks for encoded tokens only",
    r"text_transformer\.pooler\..*": "BERT's pooler; CT-CLIP takes the CLS token of the last hidden state",
    r"text_transformer\.embeddings\.position_ids": "a constant arange buffer (older transformers saved it)",
    r"visual_transformer\.vq\._codebook\.(initted|cluster_size)": "VQ bookkeeping: the k-means-init flag and EMA "
                                                                  "usage counts (dead-code replacement is off)",
    _LAYER + r"\.1\.null_kv": "null key/values; self-attention has num_null_kv=0, an empty tensor",
    _LAYER + r"\.1\.context_norm\.(gamma|beta)": "the cross-attention context norm; never called without a context",
    r"visual_transformer\..*\.norm(_out)?\.beta": "the bias-less LayerNorm's constant zero bias buffer",
}
_ZERO = re.compile(r".*\.beta$")  # unused only because it is zero: checked


@dataclass
class KeyAccounting:
    """Where every checkpoint key went and which model tensors nothing filled."""

    mapped: dict[str, list[str]] = field(default_factory=dict)  # checkpoint key → model keys
    unused: dict[str, str] = field(default_factory=dict)  # checkpoint key → reason
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts."""
        return (f"{len(self.mapped)} mapped, {len(self.unused)} unused (documented), {len(self.unknown)} unknown, "
                f"{len(self.missing)} model tensors missing, {len(self.mismatched)} shape mismatches")


def convert_state_dict(ctclip: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], KeyAccounting]:
    """Map a CT-CLIP state_dict onto ``target`` (this model's state_dict: names and shapes); no checks raised."""
    out: dict[str, torch.Tensor] = {}
    acc = KeyAccounting()
    for key, tensor in ctclip.items():
        rule = next(((m, fn) for pattern, fn in RULES if (m := re.fullmatch(pattern, key))), None)
        if rule is not None:
            filled = rule[1](rule[0], tensor)
            acc.mapped[key] = list(filled)
            for name, value in filled.items():
                if name not in target:
                    acc.unknown.append(f"{key} (→ {name}, which this model does not have)")
                elif tuple(value.shape) != tuple(target[name].shape):
                    acc.mismatched.append(f"{key} {tuple(value.shape)} → {name} {tuple(target[name].shape)}")
                else:
                    out[name] = value
            continue
        reason = next((why for pattern, why in UNUSED.items() if re.fullmatch(pattern, key)), None)
        if reason is None:
            acc.unknown.append(key)
        elif _ZERO.match(key) and tensor.numel() and not tensor.is_meta and bool(tensor.abs().max() > 0):
            acc.unknown.append(f"{key} (a LayerNorm bias CT-CLIP keeps at zero is not zero here)")
        else:
            acc.unused[key] = reason
    acc.missing = sorted(set(target) - set(out))
    return out, acc


def _read(checkpoint: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"CT-CLIP checkpoint {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"CT-CLIP checkpoint {path}: expected a state_dict (key → tensor) as CT-CLIP saves it")
    return state


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def load_ctclip(checkpoint: str | Path | Mapping[str, torch.Tensor], cfg: Config) -> CLIPModel:
    """Build ``cfg``'s model and load a CT-CLIP ``state_dict`` (a path or the dict) into it, strictly.

    Raises ConfigError listing unknown checkpoint keys, model tensors left unfilled and shape mismatches (a
    preset, text tower or ``encoder_args`` switch that differs from the checkpoint's architecture).
    """
    if cfg.model.encoder != "ctvit":
        raise ConfigError(f"model.encoder={cfg.model.encoder}: a CT-CLIP checkpoint loads into model.encoder=ctvit")
    state = _read(checkpoint)
    model = build_model(cfg)
    target = model.state_dict()
    converted, acc = convert_state_dict(state, target)
    problems = [_listing(title, keys) for title, keys in (
        ("checkpoint keys this model has no place for", acc.unknown),
        ("model tensors the checkpoint does not fill", acc.missing),
        ("shapes that differ (check model.preset, encoder_args, latent_dim, text_encoder)", acc.mismatched),
    ) if keys]
    if problems:
        raise ConfigError("CT-CLIP checkpoint does not fit this config: " + "; ".join(problems))
    model.load_state_dict(converted, strict=True)
    model.ctclip_accounting = acc
    return model
