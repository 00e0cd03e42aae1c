"""``ctlab convert SOURCE ...``: checkpoints of other codebases → this model (one subcommand per source).

``ctlab convert ctclip CHECKPOINT CONFIG [KEY=VALUE ...] --out DIR`` loads a
CT-CLIP ``state_dict`` (``CT-CLIP_v2.pt``) into the model CONFIG describes,
strictly (``core.convert.load_ctclip``), and writes ``DIR/model.pt`` (a
checkpoint ``ctlab eval --checkpoint`` reads and ``train.init_from`` starts
from), ``DIR/config.yaml`` (the resolved config) and ``DIR/keys.json`` (where
every checkpoint key went). ``ctlab convert dcformer`` does the same for a
DCFormer checkpoint (``core.convert_dcformer.load_dcformer``). A new source
adds one function to ``SOURCES``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.commands._common import add_config_arguments, config_from_args


def _write(args: argparse.Namespace, fmt: str, load: Callable) -> Any:
    """Load ``args.checkpoint`` with ``load(checkpoint, cfg)`` and write DIR/model.pt + DIR/config.yaml."""
    import torch

    from core.config import save_config

    cfg = config_from_args(args)
    model = load(args.checkpoint, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "source": {"format": fmt, "checkpoint": str(args.checkpoint)}},
               out / "model.pt")
    save_config(cfg, out / "config.yaml")
    return model


def _next_steps(out: Path) -> None:
    print(f"evaluate: ctlab eval {out / 'config.yaml'} --checkpoint {out / 'model.pt'}")
    print(f"fine-tune: ctlab train {out / 'config.yaml'} train.init_from={out / 'model.pt'}")


def convert_ctclip(args: argparse.Namespace) -> int:
    """CT-CLIP checkpoint → DIR/model.pt + DIR/config.yaml + DIR/keys.json."""
    from core.convert import load_ctclip

    out = Path(args.out)
    acc = _write(args, "ctclip", load_ctclip).ctclip_accounting
    (out / "keys.json").write_text(json.dumps({"mapped": acc.mapped, "unused": acc.unused}, indent=1))
    print(f"CT-CLIP checkpoint {args.checkpoint}: {acc.summary()}")
    print(f"wrote {out / 'model.pt'}, {out / 'config.yaml'}, {out / 'keys.json'}")
    _next_steps(out)
    return 0


def convert_dcformer(args: argparse.Namespace) -> int:
    """DCFormer checkpoint → DIR/model.pt + DIR/config.yaml."""
    from core.convert_dcformer import load_dcformer

    out = Path(args.out)
    _write(args, "dcformer", load_dcformer)
    print(f"DCFormer checkpoint {args.checkpoint}: every image-encoder tensor filled")
    print(f"wrote {out / 'model.pt'}, {out / 'config.yaml'}")
    _next_steps(out)
    return 0


def _add_ctclip(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ctclip", help="a CT-CLIP checkpoint (CT-CLIP_v2.pt) → this model",
        description="Load a CT-CLIP state_dict into the model CONFIG describes (model.encoder=ctvit, "
                    "model.text_encoder = a BERT folder of the checkpoint's text tower, model.loss=ctclip), "
                    "strictly: every checkpoint key is mapped or a documented unused one.")
    parser.add_argument("checkpoint", help="CT-CLIP state_dict file (read with torch.load(weights_only=True))")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for model.pt, config.yaml and keys.json")
    parser.set_defaults(func=convert_ctclip)


def _add_dcformer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dcformer", help="a DCFormer checkpoint (DecompModel or its CLIP model) → this model",
        description="Load a DCFormer state_dict into the model CONFIG describes (model.encoder=dcformer_*, "
                    "encoder_args.codebook_size 8192 when the checkpoint holds its quantiser), strictly: every "
                    "image-encoder tensor filled, anything left over an error naming the keys "
                    "(e.g. experiments/configs/dcformer-tiny.yaml).")
    parser.add_argument("checkpoint", help="DCFormer state_dict file (read with torch.load(weights_only=True))")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for model.pt and config.yaml")
    parser.set_defaults(func=convert_dcformer)


SOURCES: dict[str, Callable[[argparse._SubParsersAction], None]] = {"ctclip": _add_ctclip,
                                                                     "dcformer": _add_dcformer}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand group (one subcommand per source in ``SOURCES``)."""
    parser = subparsers.add_parser("convert", help="convert another codebase's checkpoint into this model",
                                   description="Convert a checkpoint of another codebase into this model's format.")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for add in SOURCES.values():
        add(sources)
