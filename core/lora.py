"""Which parameters of the CLIP model train (``model.adaptation``), and adapter files for LoRA runs.

- ``full``: everything trains.
- ``frozen_text``: the text tower is frozen; the image encoder, both
  projections and the loss's temperature (and SigLIP bias) train.
- ``lora``: as MedCT-VLM, the pretrained model is frozen and low-rank
  adapters (peft LoRA, ``W + (α/r)·B·A``, B initialised to zero) are added to
  the attention projections of both towers — ``model.lora_image_targets``
  (default ``qkv``, ``q``, ``kv`` and ``proj``: the image encoder's attention projections) and
  ``model.lora_text_targets`` (default ``query``, ``key``, ``value`` of BERT)
  with ``model.lora_rank`` / ``lora_alpha`` / ``lora_dropout``. Only the LoRA
  matrices train, plus the loss's temperature (one or two scalars; it sets
  the loss's sharpness, not the embeddings). The encoders and both
  projections stay frozen. A conv encoder has no attention: LoRA then goes
  on the text tower only and a log line says so; a transformer encoder whose
  targets match nothing is a config error.

``save_adapter`` writes what a run changed on top of its base model — the
trainable tensors and the buffers (BatchNorm statistics) — to a safetensors
file; ``load_adapter`` puts them back onto a freshly built, identically
adapted base model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from core.config import ModelConfig
from core.encoders import encoder_axes
from core.model import CLIPModel
from core.registry import ConfigError, closest

log = logging.getLogger(__name__)

# Layer types peft can wrap with LoRA.
LORA_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Total and trainable parameter counts, and the trainable share in percent."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def matching_modules(module: nn.Module, targets: list[str]) -> list[str]:
    """Names of the LoRA-capable layers in ``module`` whose name is a target or ends with ``.target`` (peft's rule)."""
    return [
        name for name, child in module.named_modules()
        if isinstance(child, LORA_LAYERS) and any(name == t or name.endswith(f".{t}") for t in targets)
    ]


def _layer_suffixes(module: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules()
                   if isinstance(child, LORA_LAYERS) and name})


def _no_match_message(tower: str, key: str, targets: list[str], module: nn.Module) -> str:
    names = _layer_suffixes(module)
    hint = closest(targets[0], names) if targets else ""
    return (f"{key}={targets}: no layer of the {tower} has that name{hint} "
            f"(its layer names: {', '.join(names) or 'none'})")


def _inject(module: nn.Module, names: list[str], cfg: ModelConfig) -> None:
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=names, bias="none")
    inject_adapter_in_model(config, module)


def _full(model: CLIPModel, cfg: ModelConfig) -> None:
    model.requires_grad_(True)


def _frozen_text(model: CLIPModel, cfg: ModelConfig) -> None:
    model.requires_grad_(True)
    model.text_encoder.requires_grad_(False)


def _lora(model: CLIPModel, cfg: ModelConfig) -> None:
    if cfg.lora_rank < 1:
        raise ConfigError(f"model.lora_rank={cfg.lora_rank}: must be >= 1, e.g. 8")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_dropout={cfg.lora_dropout}: must be in [0, 1)")
    image_names = matching_modules(model.image_encoder, cfg.lora_image_targets)
    text_names = matching_modules(model.text_encoder, cfg.lora_text_targets)
    if not text_names:
        raise ConfigError(_no_match_message("text encoder", "model.lora_text_targets", cfg.lora_text_targets,
                                            model.text_encoder))
    if not image_names and "attention" in encoder_axes(cfg.encoder):
        raise ConfigError(_no_match_message(f"image encoder '{cfg.encoder}'", "model.lora_image_targets",
                                            cfg.lora_image_targets, model.image_encoder))
    if image_names:
        _inject(model.image_encoder, image_names, cfg)
    else:
        log.warning("LoRA: image encoder '%s' has no layers named %s (a conv net has no attention); adapters go on "
                    "the text encoder only and the image tower stays frozen", cfg.encoder, cfg.lora_image_targets)
    _inject(model.text_encoder, text_names, cfg)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith("loss."))
    log.info("LoRA rank %d on %d image-encoder and %d text-encoder layers", cfg.lora_rank, len(image_names),
             len(text_names))


ADAPTATIONS: dict[str, Callable[[CLIPModel, ModelConfig], None]] = {
    "full": _full,
    "frozen_text": _frozen_text,
    "lora": _lora,
}


def apply_adaptation(model: CLIPModel, cfg: ModelConfig) -> dict[str, float]:
    """Set which parameters of ``model`` train per ``cfg.adaptation`` (adding LoRA layers in place for ``lora``).

    Call it on a freshly built model, before moving it to a device and building
    the optimizer. Returns ``params_total``, ``params_trainable`` and
    ``trainable_pct`` (after adaptation, LoRA weights included in the total).
    """
    if cfg.adaptation not in ADAPTATIONS:
        raise ConfigError(f"model.adaptation: unknown '{cfg.adaptation}'{closest(cfg.adaptation, list(ADAPTATIONS))} "
                          f"(choices: {', '.join(ADAPTATIONS)})")
    ADAPTATIONS[cfg.adaptation](model, cfg)
    summary = trainable_summary(model)
    log.info("adaptation %s: %d of %d parameters train (%.3f %%)", cfg.adaptation, summary["params_trainable"],
             summary["params_total"], summary["trainable_pct"])
    return summary


def adapter_state_names(model: nn.Module) -> list[str]:
    """The state-dict names an adapter holds: trainable parameters and all persistent buffers."""
    return [name for name, value in model.state_dict(keep_vars=True).items()
            if not isinstance(value, nn.Parameter) or value.requires_grad]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapted model holds beyond its frozen base (see ``adapter_state_names``), as CPU tensors."""
    state = model.state_dict()
    return {name: state[name].detach().cpu().contiguous().clone() for name in adapter_state_names(model)}


def save_adapter(model: nn.Module, path: str | Path) -> int:
    """Write ``adapter_state(model)`` as a safetensors file; returns its size in bytes.

    For a LoRA run this is the LoRA matrices and the loss's temperature — a
    small fraction of a full checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(path), metadata={"format": "pt", "content": "ctlab adapter"})
    return path.stat().st_size


def load_adapter(model: nn.Module, path: str | Path) -> int:
    """Load an adapter file written by ``save_adapter`` onto ``model``; returns the number of tensors loaded.

    ``model`` must be the same base model, built and adapted with the same
    config; anything that does not line up is named in the error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file '{path}' does not exist")
    tensors = load_file(str(path))
    own = model.state_dict()
    fix = "build the model from the run's config (encoder, adaptation, LoRA rank and targets) and adapt it first"
    if unknown := sorted(set(tensors) - set(own)):
        raise ConfigError(f"adapter '{path}' holds {len(unknown)} tensors this model lacks (e.g. {unknown[0]}); {fix}")
    if wrong := [n for n, t in tensors.items() if t.shape != own[n].shape]:
        name = wrong[0]
        raise ConfigError(f"adapter '{path}': {name} has shape {tuple(tensors[name].shape)}, the model "
                          f"{tuple(own[name].shape)}; {fix}")
    if uncovered := sorted(set(adapter_state_names(model)) - set(tensors)):
        raise ConfigError(f"adapter '{path}' lacks {len(uncovered)} tensors this model trains (e.g. {uncovered[0]}); "
                          f"{fix}")
    model.load_state_dict(tensors, strict=False)
    return len(tensors)

