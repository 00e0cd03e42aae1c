"""The bench's tables: which configs each one measures, and how its figures are laid out and written.

- zoo: every attention × norm × mlp combination an encoder takes (the first
  one — standard + layernorm + gelu for CT-ViT, CT-CLIP's own — is the baseline);
- encoders: every registered image encoder at one preset, beside the DCFormer
  paper's Params / GFLOPs;
- reports: a markdown table (printed and written) and a CSV of the raw figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from core.bench.model import encoder_gflops, meta_encoder
from core.bench.probes import count_macs_fvcore
from core.config import Config, load_config
from core.encoders import create_encoder, encoder_axes
from core.layers.attention import flash_unavailable_reason
from core.model import count_parameters
from core.registry import ATTENTION, ENCODERS, MLP, NORM, ConfigError, Registry

AXIS_REGISTRIES: dict[str, Registry] = {"attention": ATTENTION, "norm": NORM, "mlp": MLP}

# Params (M) and GFLOPs of the image encoders in the DCFormer paper (Ates et al., "DCFormer: Efficient 3D
# Vision-Language Modeling with Decomposed Convolutions", arXiv:2502.05091, zero-shot table; also in the
# README of github.com/mirthAI/DCFormer), at its input of 512 × 512 × 256 voxels, i.e. (D, H, W) = (256, 512, 512).
# The authors count with flopth / fvcore (models/dcformer.py of that repository), which count one multiply-add as
# one FLOP: their "GFLOPs" are GMACs, half of what torch's FLOP counter reports for the same layers.
PAPER_INPUT_SHAPE = (256, 512, 512)
PAPER_ENCODER_TABLE: dict[tuple[str, str], tuple[float, float]] = {
    ("DCFormer", "nano"): (0.92, 34.21),
    ("DCFormer", "naive"): (5.85, 49.48),
    ("DCFormer", "tiny"): (15.1, 168.2),
    ("ConvNeXt", "nano"): (3.19, 31.92),
    ("ConvNeXt", "naive"): (15.63, 96.84),
    ("ConvNeXt", "tiny"): (31.59, 156.31),
    ("PoolFormer", "nano"): (2.79, 27.14),
    ("PoolFormer", "naive"): (11.31, 63.75),
    ("PoolFormer", "tiny"): (20.68, 117.46),
    ("TransUNet", "naive"): (12.48, 118.9),
    ("TransUNet", "tiny"): (23.93, 207.5),
    ("ViT", "naive"): (11.10, 39.05),
    ("ViT", "tiny"): (26.34, 86.43),
    ("CT-ViT", "-"): (101.1, 160.5),
}
# (encoder, preset) → paper row, only where the preset is the paper's configuration; preset None = any preset.
PAPER_ROWS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("dcformer_nano", None): ("DCFormer", "nano"),
    ("dcformer_naive", None): ("DCFormer", "naive"),
    ("dcformer_tiny", None): ("DCFormer", "tiny"),
    ("convnext3d", "base"): ("ConvNeXt", "tiny"),  # ConvNeXt-T widths and depths
    ("ctvit", "ctclip"): ("CT-ViT", "-"),
    ("ctvit", "default"): ("CT-ViT", "-"),
}


# What each encoder's code is, and the paper's rows of the same family (printed beside ours in the encoders table).
IMPLEMENTATION = {
    "dcformer": "DCFormer's function (authors' code: parity fixture, load_dcformer)",
    "ctvit": "CT-CLIP's CT-ViT (its public code)",
    "convnext3d": "our 3D version (DCFormer's repository has no code for it, only numbers)",
    "poolformer3d": "our 3D version (DCFormer's repository has no code for it, only numbers)",
    "vit3d": "our 3D version (DCFormer's repository has no code for it, only numbers)",
    "hybrid": "our 3D version (CTInstruct-style; not in the DCFormer paper)",
}
PAPER_FAMILY = {"convnext3d": "ConvNeXt", "poolformer3d": "PoolFormer", "vit3d": "ViT", "ctvit": "CT-ViT"}


def implementation(encoder: str) -> str:
    """Whose function an encoder computes: the authors' (DCFormer, CT-ViT) or our 3D version."""
    return next((v for k, v in IMPLEMENTATION.items() if encoder.startswith(k)), "ours")


def paper_family(encoder: str) -> str | None:
    """The DCFormer paper's rows of this encoder's family, ``name params M / GFLOPs; ...`` (None: no such row)."""
    family = PAPER_FAMILY.get(encoder)
    rows = [f"{(name + ' ' + size).replace(' -', '')} {p:g} M / {g:g}"
            for (name, size), (p, g) in PAPER_ENCODER_TABLE.items() if name == family]
    return "; ".join(rows) or None


def params_basis(encoder_params: float, with_projection: float, paper_m: float | None) -> str | None:
    """Which of our counts the paper's Params figure is: the one that rounds to it at the paper's precision."""
    if paper_m is None or pd.isna(paper_m):
        return None
    decimals = len(repr(float(paper_m)).split(".")[1])
    matches = [name for name, value in (("encoder", encoder_params), ("encoder + projection", with_projection))
               if round(value / 1e6, decimals) == round(paper_m, decimals)]
    return " = ".join(matches) or "neither (a different network)"


def paper_reference(encoder: str, preset: str | None) -> tuple[str, float, float] | None:
    """The DCFormer paper's (row name, Params M, GFLOPs) for this encoder at this preset, or None."""
    key = PAPER_ROWS.get((encoder, None)) or PAPER_ROWS.get((encoder, preset or "default"))
    if key is None:
        return None
    return (" ".join(k for k in key if k != "-"), *PAPER_ENCODER_TABLE[key])


def base_overrides(encoder: str, preset: str | None, shape: Sequence[int], text_encoder: str) -> list[str]:
    """Dotted overrides naming an encoder, its preset, the input shape and the text encoder."""
    return [f"model.encoder={encoder}", *([f"model.preset={preset}"] if preset else []),
            f"data.target_shape=[{', '.join(map(str, shape))}]", f"model.text_encoder={text_encoder}"]


def zoo_configs(
    encoder: str = "ctvit",
    preset: str | None = "tiny",
    shape: Sequence[int] = (32, 64, 64),
    text_encoder: str = "tiny-random",
    overrides: Sequence[str] = (),
) -> tuple[dict[str, Config], dict[str, str]]:
    """Configs for every combination of the axes ``encoder`` takes, labelled ``attention+norm+mlp``,
    and the combinations that cannot run here with the reason (``flash`` without flash-attn or CUDA)."""
    axes = list(encoder_axes(encoder))
    base = base_overrides(encoder, preset, shape, text_encoder)
    flash_reason = flash_unavailable_reason()
    configs: dict[str, Config] = {}
    skipped: dict[str, str] = {}
    for combo in itertools.product(*(AXIS_REGISTRIES[axis].names() for axis in axes)):
        values = dict(zip(axes, combo, strict=True))
        label = "+".join(combo) or encoder
        if values.get("attention") == "flash" and flash_reason:
            skipped[label] = flash_reason
            continue
        axis_overrides = [f"model.{axis}={value}" for axis, value in values.items()]
        configs[label] = load_config(None, [*base, *axis_overrides, f"name={label}", *overrides])
    return configs, skipped


def encoder_configs(
    preset: str = "tiny",
    shape: Sequence[int] = (32, 64, 64),
    text_encoder: str = "tiny-random",
    overrides: Sequence[str] = (),
) -> tuple[dict[str, Config], dict[str, str]]:
    """One config per registered encoder at ``preset`` (its default preset when it has no such one),
    and the encoders that cannot be built at ``shape`` with the reason."""
    configs: dict[str, Config] = {}
    skipped: dict[str, str] = {}
    for encoder in ENCODERS.names():
        reason = ""
        for candidate in (preset, None):
            cfg = load_config(None, [*base_overrides(encoder, candidate, shape, text_encoder), f"name={encoder}",
                                     *overrides])
            try:
                with torch.device("meta"):
                    create_encoder(cfg.model, tuple(shape))
            except ConfigError as err:
                reason = str(err)
                continue
            configs[encoder] = cfg
            break
        else:
            skipped[encoder] = reason
    return configs, skipped


def encoder_size(cfg: Config) -> dict[str, Any]:
    """Image-encoder params and forward GFLOPs of ``cfg`` without running it (built on the meta device)."""
    with torch.device("meta"):
        encoder = create_encoder(cfg.model, tuple(cfg.data.target_shape))
    params = count_parameters(encoder)
    return {"label": cfg.name, "encoder": cfg.model.encoder, "preset": cfg.model.preset or "default",
            "input_shape": "x".join(map(str, cfg.data.target_shape)), "image_params_total": params["total"],
            "image_params_trainable": params["trainable"], "gflops": encoder_gflops(cfg)}


def encoder_fvcore_size(cfg: Config) -> dict[str, float]:
    """GMACs as fvcore counts them (train mode, BatchNorm 5 × its input) and params with the latent projection.

    Built on the meta device, in train mode as a fresh module is — the state
    in which the DCFormer authors ran fvcore's ``FlopCountAnalysis``.
    """
    encoder, volume = meta_encoder(cfg)
    params = count_parameters(encoder)["total"]
    return {"gmacs_fvcore": count_macs_fvcore(encoder, volume) / 1e9,
            "image_params_proj": params + encoder.out_dim * cfg.model.latent_dim}


# --------------------------------------------------------------------------- layout

# column → (heading, format) for the markdown tables; the CSV keeps the raw values.
COLUMNS: dict[str, tuple[str, str]] = {
    "label": ("config", "{}"),
    "encoder": ("encoder", "{}"),
    "preset": ("preset", "{}"),
    "attention": ("attention", "{}"),
    "norm": ("norm", "{}"),
    "mlp": ("mlp", "{}"),
    "input_shape": ("input", "{}"),
    "image_params_m": ("image params (M)", "{:.3f}"),
    "params_m": ("params (M)", "{:.3f}"),
    "trainable_m": ("trainable (M)", "{:.3f}"),
    "gflops": ("GFLOPs", "{:.3f}"),
    "gmacs": ("GMACs", "{:.3f}"),
    "visual_fwd_ms": ("fwd ms", "{:.1f}"),
    "visual_bwd_ms": ("bwd ms", "{:.1f}"),
    "fwd_bwd_ms": ("fwd+bwd ms", "{:.1f}"),
    "step_ms": ("step ms", "{:.1f}"),
    "step_ms_min": ("step ms min", "{:.1f}"),
    "step_ms_max": ("step ms max", "{:.1f}"),
    "samples_per_s": ("samples/s", "{:.2f}"),
    "peak_memory_mb": ("peak MB", "{:.1f}"),
    "memory_ratio": ("memory ratio", "{:.3f}"),
    "step_speedup": ("step speed-up", "{:.3f}×"),
    "step_speedup_min": ("speed-up min", "{:.2f}×"),
    "step_speedup_max": ("speed-up max", "{:.2f}×"),
    "memory_vs_modern": ("memory vs modern", "{:.3f}"),
    "speedup_vs_modern": ("speed-up vs modern", "{:.3f}×"),
    "pays": ("pays", "{}"),
    "precision": ("precision", "{}"),
    "max_batch": ("largest batch", "{}"),
    "throughput_ratio": ("samples/s ratio", "{:.2f}×"),
    "num_workers": ("workers", "{}"),
    "pin_memory": ("pinned", "{}"),
    "persistent_workers": ("persistent", "{}"),
    "prefetch_factor": ("prefetch", "{:.0f}"),
    "data_wait_ms": ("data wait ms", "{:.1f}"),
    "data_wait_ms_max": ("data wait ms max", "{:.1f}"),
    "wait_fraction": ("wait fraction", "{:.3f}"),
    "volume_mb": ("input MB", "{:.1f}"),
    "fwd_ms": ("fwd ms", "{:.1f}"),
    "bwd_ms": ("bwd ms", "{:.1f}"),
    "saved_mb": ("kept for backward MB", "{:.1f}"),
    "visual_fwd_ratio": ("fwd ratio", "{:.3f}"),
    "visual_bwd_ratio": ("bwd ratio", "{:.3f}"),
    "paper": ("paper row", "{}"),
    "paper_params_m": ("paper params (M)", "{:.2f}"),
    "gmacs_fvcore": ("GMACs fvcore", "{:.3f}"),
    "image_params_proj_m": ("+ projection (M)", "{:.3f}"),
    "paper_params_basis": ("paper params are", "{}"),
    "implementation": ("implementation", "{}"),
    "paper_family": ("paper rows of the family (params / GFLOPs)", "{}"),
    "paper_gflops": ("paper GFLOPs", "{:.2f}"),
    "status": ("status", "{}"),
}


INTEGER_COLUMNS = ("params_total", "params_trainable", "image_params_total", "image_params_trainable", "batch_size",
                   "repeats", "warmup")


def results_frame(comparison: Mapping[str, Any], skipped: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per config of a ``compare`` output (records, ratios, derived columns), then one per skipped config."""
    rows = []
    for label, record in comparison["results"].items():
        row = {k: v for k, v in record.items() if k != "config"}
        row.update(comparison["ratios"][label])
        row["image_params_m"] = record["image_params_total"] / 1e6
        row["params_m"] = record["params_total"] / 1e6
        row["trainable_m"] = record["params_trainable"] / 1e6
        row["fwd_bwd_ms"] = record["visual_fwd_ms"] + record["visual_bwd_ms"]
        row["status"] = "baseline" if label == comparison["baseline"] else "ok"
        rows.append(row)
    all_skipped = {**comparison.get("skipped", {}), **(skipped or {})}
    rows.extend({"label": label, "status": f"skipped: {why}"} for label, why in all_skipped.items())
    frame = pd.DataFrame(rows)
    counts = [c for c in INTEGER_COLUMNS if c in frame]
    return frame.astype(dict.fromkeys(counts, "Int64"))  # integers stay integers beside skipped rows


def to_markdown(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``columns`` of ``frame``, formatted per ``COLUMNS``; blanks for missing values."""
    columns = [c for c in columns if c in frame.columns]

    def cell(value: Any, fmt: str) -> str:
        if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)):
            return ""
        return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    header = [COLUMNS.get(c, (c, "{}"))[0] for c in columns]
    body = [[cell(row[c], COLUMNS.get(c, (c, "{}"))[1]) for c in columns] for _, row in frame.iterrows()]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(lines)


def write_report(frame: pd.DataFrame, columns: Sequence[str], out_dir: str | Path, name: str,
                 notes: Sequence[str] = ()) -> tuple[str, list[Path]]:
    """Write ``<out_dir>/<name>.md`` (notes, then the table) and ``<name>.csv`` (raw figures); returns the
    markdown text and the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join([*notes, to_markdown(frame, columns)]) + "\n"
    md, csv = out / f"{name}.md", out / f"{name}.csv"
    md.write_text(text)
    frame.to_csv(csv, index=False)
    return text, [md, csv]


def run_notes(comparison: Mapping[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """One line saying how a comparison was measured (device, batch, warm-up, repeats, memory measure)."""
    records = list(comparison["results"].values())
    if not records:
        return list(extra)
    r = records[0]
    return [f"device {r['device']}, batch {r['batch_size']}, input {r['input_shape']}, precision {r['precision']}, "
            f"{r['warmup']} warm-up + median of {r['repeats']} repeats (alternating across configs); "
            f"GFLOPs = image-encoder forward per volume; peak memory = {r['memory_measure']}; "
            f"baseline {comparison['baseline']}", *extra]
