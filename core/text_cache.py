"""Report features of a frozen text tower, computed once per data set and kept on disk.

Under ``model.adaptation=frozen_text`` the text tower cannot change, so
running it on every report at every step only repeats work: a pretrained
tower such as MiniLM costs more per batch on a CPU than the tiny image
encoder. ``report_features`` runs the tower once over a split's reports (in
eval mode, as a frozen tower should be) and saves the pooled features under
``data.cache_dir/text-features/``, keyed by the tower, its settings and the
texts; later runs and matrix cells load them. ``FeatureCollate`` then gives
each batch its reports' features in place of tokens, and the model projects them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.config import Config
from core.text import TextEncoder

log = logging.getLogger(__name__)


def features_path(cfg: Config, texts: list[str]) -> Path:
    """Where the features of ``texts`` under this config's text tower live in the data cache."""
    m = cfg.model
    key = json.dumps([m.text_encoder, m.text_pool, m.text_unit, m.text_max_length, texts])
    return Path(cfg.data.cache_dir) / "text-features" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


@torch.no_grad()
def report_features(encoder: TextEncoder, texts: list[str], path: Path, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    """Pooled text-tower features of ``texts`` (N, out_dim), loaded from ``path`` or computed and saved there."""
    if path.is_file():
        try:
            features = torch.load(path, weights_only=True)
        except Exception as err:  # a torn write or a foreign file: recompute rather than fail the run
            log.warning("text features %s unreadable (%s); computing them again", path, err)
        else:
            if features.shape == (len(texts), encoder.out_dim):
                return features
            log.warning("text features %s have shape %s, expected %s; computing them again", path,
                        tuple(features.shape), (len(texts), encoder.out_dim))
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="text features", disable=not progress, leave=False):
        tokens = encoder.tokenize(texts[start:start + batch_size])
        chunks.append(encoder(**{k: v.to(device) for k, v in tokens.items()}).float().cpu())
    encoder.train(was_training)
    features = torch.cat(chunks) if chunks else torch.zeros(0, encoder.out_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(features, partial)
    partial.replace(path)
    log.info("text features: %d reports embedded once into %s", len(texts), path)
    return features


class FeatureCollate:
    """Wraps a collate function: adds ``text_features`` (B, out_dim) looked up by each item's report text."""

    def __init__(self, collate: Any, texts: list[str], features: torch.Tensor) -> None:
        self.collate, self.features = collate, features
        self.row = {text: i for i, text in enumerate(texts)}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        batch["text_features"] = self.features[[self.row[text] for text in batch["text"]]]
        return batch
