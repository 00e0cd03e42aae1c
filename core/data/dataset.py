"""The training Dataset: prepared volumes memory-mapped from the cache, with their report and labels.

It never decodes a NIfTI: ``core.data.prepare`` must have run for the same
``data.*`` settings (the trainer calls it first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from core.config import DataConfig
from core.data.cache import data_fingerprint, index_path, load_index, load_summary
from core.data.preprocess import decode


class CachedCTDataset(Dataset):
    """Items ``{"volume": (1, D, H, W) float32 in [-1, 1], "text": str, "labels": (18,) float32, "name": str}``.

    Also exposes ``names``, ``texts``, ``labels`` ((N, 18) float32, PATHOLOGIES
    order) for evaluation, ``skipped`` (reason → count from the last prepare)
    and ``fingerprint``.
    """

    def __init__(self, cfg: DataConfig, split: str) -> None:
        index = load_index(cfg, split)
        self.split = split
        self.folder = index_path(cfg, split).parent
        self.shape = tuple(index["shape"])
        self.entries: list[dict[str, Any]] = index["volumes"]
        self.names = [e["name"] for e in self.entries]
        self.texts = [e["text"] for e in self.entries]
        self.labels = np.asarray([e["labels"] for e in self.entries], dtype=np.float32).reshape(len(self.entries), -1)
        summary = load_summary(cfg, split) or {}
        self.skipped: dict[str, int] = summary.get("skipped", {})
        self.fingerprint = data_fingerprint(cfg, split)

    def __len__(self) -> int:
        return len(self.entries)

    def volume(self, index: int) -> torch.Tensor:
        """The preprocessed volume ``index`` as a float32 (D, H, W) tensor, read through a memory map."""
        return decode(np.load(Path(self.folder, self.entries[index]["file"]), mmap_mode="r"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "volume": self.volume(index)[None],
            "text": self.texts[index],
            "labels": torch.from_numpy(self.labels[index].copy()),
            "name": self.names[index],
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: volume (B, 1, D, H, W), labels (B, 18), text and name as lists."""
    return {
        "volume": torch.stack([item["volume"] for item in items]),
        "text": [item["text"] for item in items],
        "labels": torch.stack([item["labels"] for item in items]),
        "name": [item["name"] for item in items],
    }
