"""CT-RATE data: the reader, preprocessing and cache, the training Dataset, and a synthetic CT-RATE.

The public names below are imported on first use, so ``from core.data import PATHOLOGIES``
(or the synthetic generator's worker processes) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from core.data.pathologies import PATHOLOGIES

_EXPORTS = {
    "CachedCTDataset": "core.data.dataset",
    "collate": "core.data.dataset",
    "prepare": "core.data.cache",
    "PrepareSummary": "core.data.cache",
    "data_fingerprint": "core.data.cache",
    "load_summary": "core.data.cache",
    "read_split": "core.data.ctrate",
    "synthesize": "core.data.synthetic",
    "bench_data": "core.data.bench",
}

__all__ = ["PATHOLOGIES", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'core.data' has no attribute '{name}'")
