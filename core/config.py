"""Run configuration: one dataclass tree, loaded from YAML, strictly validated.

``load_config(path, overrides)`` is the only way a run gets its settings:
YAML (``yaml.safe_load``) → dotted CLI overrides (``model.attention=sdpa``) →
type checks and choice checks → a frozen-in-shape ``Config``. Unknown keys
and bad values raise ``ConfigError`` naming the key and the closest valid
one. ``save_config`` writes the resolved YAML that every run logs.

Axis order convention: shapes and spacings are (D, H, W) — slices, rows,
columns — the order of the model input (C, D, H, W).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.registry import ATTENTION, ENCODERS, INTENSITY, LOSSES, MLP, NORM, PROTOCOLS, ConfigError, Registry, closest

# Fields whose value must be a name in a registry (None = "the encoder's default").
_REGISTRY_FIELDS: dict[str, Registry] = {
    "model.encoder": ENCODERS,
    "model.attention": ATTENTION,
    "model.norm": NORM,
    "model.mlp": MLP,
    "model.loss": LOSSES,
    "data.intensity": INTENSITY,
}


@dataclass
class ModelConfig:
    """The CLIP model: image encoder, text encoder, projections and the contrastive loss."""

    encoder: str = "ctvit"
    preset: str | None = None  # encoder preset; None = the encoder's default preset
    encoder_args: dict[str, Any] = field(default_factory=dict)  # overrides of preset fields
    attention: str | None = None  # None = the encoder's default (for encoders with that axis)
    norm: str | None = None
    mlp: str | None = None
    loss: str = "clip"
    # log-space; None = loss default (clip log(1/0.07), ctclip 1.0 unclamped, siglip log 10)
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None  # siglip only; None = -10
    logit_scale_learnable: bool = True  # false: the scale stays at its init (DCFormer: log-scale 1.0, i.e. e)
    latent_dim: int = 512
    text_encoder: str = "minilm"  # "minilm" (shipped), "tiny-random", a hub id or a local path
    text_pool: Literal["cls", "mean"] = "cls"
    text_unit: Literal["report", "sentence"] = "report"  # encode reports whole, or per sentence and average
    text_max_length: int = 128
    adaptation: Literal["full", "frozen_text", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # image attention projections: qkv/proj (vit3d, hybrid), q/kv/proj (ctvit: q and k, v come from different inputs)
    lora_image_targets: list[str] = field(default_factory=lambda: ["qkv", "q", "kv", "proj"])
    lora_text_targets: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    grad_checkpointing: bool = False
    sdpa_backend: Literal["auto", "flash", "efficient", "math", "cudnn"] = "auto"  # sdpa attention only


@dataclass
class DataConfig:
    """Where the CT-RATE data lives and how volumes are preprocessed and cached."""

    root: str = "data/synthetic"  # CT-RATE's dataset/ folder (train_fixed/ or train/, radiology_text_reports/, ...)
    cache_dir: str = "data/cache"
    # split → volume folder under root; a split not listed is detected: <split>_fixed (v2), else <split> (v1)
    volume_dirs: dict[str, str] = field(default_factory=dict)
    reports_csv: dict[str, str] = field(
        default_factory=lambda: {
            "train": "radiology_text_reports/train_reports.csv",
            "valid": "radiology_text_reports/validation_reports.csv",
        }
    )
    labels_csv: dict[str, str] = field(
        default_factory=lambda: {
            "train": "multi_abnormality_labels/train_predicted_labels.csv",
            "valid": "multi_abnormality_labels/valid_predicted_labels.csv",
        }
    )
    metadata_csv: dict[str, str] = field(
        default_factory=lambda: {
            "train": "metadata/train_metadata.csv",
            "valid": "metadata/validation_metadata.csv",
        }
    )
    # report columns joined into a volume's text, per split (CT-CLIP's choice) or one list for every split
    text_fields: dict[str, list[str]] | list[str] = field(
        default_factory=lambda: {"train": ["Findings_EN"], "valid": ["Findings_EN", "Impressions_EN"]}
    )
    drop_text: list[str] = field(default_factory=lambda: ["Not given."])  # report fields with this text are empty
    # how stored values become HU: auto (decided per volume from the file's content), or forced for every volume
    rescale: Literal["auto", "metadata", "header", "none"] = "auto"
    target_spacing: list[float] = field(default_factory=lambda: [1.5, 0.75, 0.75])  # mm, (D, H, W)
    target_shape: list[int] = field(default_factory=lambda: [240, 480, 480])  # voxels, (D, H, W)
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    intensity: str = "ctclip"  # HU → model values (core.data.intensity): ctclip (hu_window → [-1, 1]) | dcformer
    cache_dtype: Literal["float16", "int16"] = "float16"
    subset_fraction: float = 1.0  # a seeded random part of every split
    subset_seed: int = 0
    subset: Literal["seeded", "ctclip_first80"] = "seeded"  # ctclip_first80: first 80 % of train, as CT-CLIP
    num_workers: int = 0
    pin_memory: bool = True
    prefetch_factor: int = 2
    persistent_workers: bool = True


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and checkpointing of one run."""

    task: Literal["clip", "probe", "finetune"] = "clip"
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None = all epochs)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1.25e-6
    text_lr_scale: float = 1.0  # the text tower's lr = lr × this (e.g. 0.1 to fine-tune a pretrained tower)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 300
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    compile_mode: str = "default"
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    output_dir: str = "runs"
    log_every: int = 1
    init_from: str | None = None  # a checkpoint (e.g. from `ctlab convert ctclip`) whose model weights start the run


@dataclass
class ProbeConfig:
    """The linear probe every training run fits at its end on frozen image embeddings (core/probe.py).

    Defaults are CT-CLIP's CT-LiPro settings; the deviations (lr, warm-up
    fraction, ``min_steps``, ``standardize``) and why are in core/probe.py.
    """

    enabled: bool = True
    epochs: int = 10
    min_steps: int = 1000  # at least this many optimizer steps (more epochs on a small split)
    batch_size: int = 8
    lr: float = 1e-2  # on standardised features; CT-CLIP: 1e-5 (README) / 1e-3 (args.py) on raw unit latents
    weight_decay: float = 0.1
    warmup_fraction: float = 0.2  # of the probe's steps, linear warm-up then cosine to 0
    dropout: float = 0.3
    relu: bool = True  # CT-CLIP's ReLU on the latent before the linear layer (false: a plain linear probe)
    grad_clip: float | None = 1.0
    class_weight: Literal["balanced", "none"] = "balanced"  # balanced: pos_weight = negatives / positives
    standardize: bool = True  # standardise the ReLU'd features (false: CT-CLIP's head exactly)


@dataclass
class EvalConfig:
    """Zero-shot evaluation, retrieval, confidence intervals and the linear probe."""

    split: str = "valid"
    protocols: list[str] = field(default_factory=lambda: ["ctclip", "fixed0.5"])  # core.metrics THRESHOLDS
    every_epoch: bool = True
    batch_size: int = 8
    bootstrap: int = 1000
    ci: float = 0.95
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10, 50])
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class TrackingConfig:
    """Where runs are logged (MLflow) and under which experiment."""

    uri: str | None = None  # None: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db
    experiment: str = "ctlab"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True  # training runs log MLflow system metrics (CPU, memory; GPU on CUDA)
    system_metrics_interval_s: float = 10.0  # seconds between system-metrics samples


@dataclass
class Config:
    """One resolved run configuration."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- loading


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Coerce ``value`` to the type ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{key}: '{value}' is not a valid value{closest(value, args)} (choices: {choices})")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _check_value(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads "1e-6" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'{closest(key, names)} (valid keys: {', '.join(names)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _check_value(value, hint, full)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check values that depend on other values or on registries; returns ``cfg``."""
    for key, registry in _REGISTRY_FIELDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value not in registry:
            names = registry.names()
            raise ConfigError(
                f"{key}: unknown {registry.kind} '{value}'{closest(value, names)} (choices: {', '.join(names)})"
            )
    for protocol in cfg.eval.protocols:
        if protocol not in PROTOCOLS:
            names = PROTOCOLS.names()
            raise ConfigError(f"eval.protocols: unknown protocol '{protocol}'{closest(protocol, names)} "
                              f"(choices: {', '.join(names)})")
    fixed_window = INTENSITY.meta(cfg.data.intensity).get("window")
    if fixed_window and list(cfg.data.hu_window) != DataConfig().hu_window:
        raise ConfigError(f"data.hu_window: data.intensity={cfg.data.intensity} has its own window "
                          f"{list(fixed_window)}; remove data.hu_window or use data.intensity=ctclip")
    checks = [
        (len(cfg.data.target_shape) == 3, "data.target_shape: needs 3 values (D, H, W)"),
        (len(cfg.data.target_spacing) == 3, "data.target_spacing: needs 3 values in mm (D, H, W)"),
        (all(s > 0 for s in cfg.data.target_spacing), "data.target_spacing: values must be > 0"),
        (len(cfg.data.hu_window) == 2 and cfg.data.hu_window[0] < cfg.data.hu_window[1],
         "data.hu_window: needs [low, high] with low < high"),
        (0.0 < cfg.data.subset_fraction <= 1.0, "data.subset_fraction: must be in (0, 1]"),
        (all(cfg.data.text_fields.values()) if isinstance(cfg.data.text_fields, dict) else bool(cfg.data.text_fields),
         "data.text_fields: name at least one report column per split, e.g. {train: [Findings_EN]}"),
        (cfg.train.batch_size >= 1, "train.batch_size: must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum: must be >= 1"),
        (cfg.train.lr > 0, "train.lr: must be > 0"),
        (cfg.train.text_lr_scale >= 0, "train.text_lr_scale: must be >= 0 (0 holds the text tower still)"),
        (cfg.train.epochs >= 1, "train.epochs: must be >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps: must be >= 1 or null"),
        (0.0 < cfg.eval.ci < 1.0, "eval.ci: must be in (0, 1), e.g. 0.95"),
        (cfg.tracking.system_metrics_interval_s > 0,
         "tracking.system_metrics_interval_s: must be > 0 (turn sampling off with tracking.system_metrics=false)"),
        (cfg.eval.probe.epochs >= 1, "eval.probe.epochs: must be >= 1"),
        (cfg.eval.probe.min_steps >= 0, "eval.probe.min_steps: must be >= 0"),
        (cfg.eval.probe.batch_size >= 1, "eval.probe.batch_size: must be >= 1"),
        (cfg.eval.probe.lr > 0, "eval.probe.lr: must be > 0"),
        (cfg.eval.probe.weight_decay >= 0, "eval.probe.weight_decay: must be >= 0"),
        (0.0 <= cfg.eval.probe.warmup_fraction < 1.0, "eval.probe.warmup_fraction: must be in [0, 1), e.g. 0.2"),
        (0.0 <= cfg.eval.probe.dropout < 1.0, "eval.probe.dropout: must be in [0, 1), e.g. 0.3"),
        (len(cfg.eval.protocols) >= 1, "eval.protocols: name at least one protocol, e.g. [ctclip]"),
        (cfg.model.latent_dim >= 1, "model.latent_dim: must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (YAML-shaped) mapping."""
    return validate(_build(Config, copy.deepcopy(data or {}), ""))


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"model.attention=sdpa"`` into its dotted key and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. model.attention=sdpa")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed.

    Keys under a free-form mapping field (``model.encoder_args.dim``) go one level deeper.
    """
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides (``["k=v", ...]`` or ``{k: v}``) applied."""
    out = copy.deepcopy(data or {})
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(out, key, value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a plain mapping (what YAML and MLflow params see)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML that ``load_config`` reads back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"attention": "sdpa"}}`` → ``{"model.attention": "sdpa"}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Keys that change where or how a run is logged or fed, never what it trains (the probe reads out a trained model,
# so runs differing only in eval.probe share a checkpoint folder and a matrix cell).
NON_SEMANTIC_KEYS = ("name", "tracking.", "train.output_dir", "train.log_every", "train.checkpoint_every",
                      "data.root", "data.cache_dir", "data.num_workers", "data.pin_memory", "data.prefetch_factor",
                      "data.persistent_workers", "train.device", "eval.every_epoch", "model.sdpa_backend",
                      "eval.probe.")


def config_id(cfg: Config, length: int = 12) -> str:
    """A stable hash of everything that changes a run's result (not where it is logged or stored)."""
    items = {k: v for k, v in flatten(config_to_dict(cfg)).items() if not k.startswith(NON_SEMANTIC_KEYS)}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:length]
