"""Data-loading throughput: decoding NIfTI per item (as CT-CLIP's loader does) vs the prepared cache."""

from __future__ import annotations

import time
from typing import Any

import torch

from core.config import DataConfig
from core.data.cache import prepare
from core.data.ctrate import read_split
from core.data.dataset import CachedCTDataset
from core.data.preprocess import Preprocessing, preprocess_file


def bench_data(cfg: DataConfig, split: str = "train", n: int = 32) -> dict[str, Any]:
    """Volumes/s of the on-the-fly path vs the cached Dataset on the same ``n`` volumes, in one process.

    On the fly = nibabel decode + HU + resample + window + crop/pad + tensor,
    per item. Cached = ``CachedCTDataset.__getitem__`` (memory map + float32
    tensor). Both run with one intra-op thread, as in a DataLoader worker.
    The cache is prepared first if it is not yet (a no-op otherwise).
    ``max_abs_diff`` checks that both paths give the same volumes (up to the
    cache dtype's rounding).
    """
    prepare(cfg, splits=(split,), progress=False)
    dataset = CachedCTDataset(cfg, split)
    records = {r.name: r for r in read_split(cfg, split).records}
    count = min(n, len(dataset))
    if count == 0:
        raise ValueError(f"split '{split}' has no usable volumes to benchmark")
    prep = Preprocessing.from_config(cfg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        fresh = []
        for i in range(count):
            r = records[dataset.names[i]]
            fresh.append(torch.from_numpy(preprocess_file(r.path, prep, r.slope, r.intercept, r.spacing))[None])
        onthefly_s = time.perf_counter() - start

        start = time.perf_counter()
        cached = [dataset[i]["volume"] for i in range(count)]
        cached_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    diff = max(float((a - b).abs().max()) for a, b in zip(fresh, cached, strict=True))
    return {
        "split": split,
        "volumes": count,
        "shape": list(dataset.shape),
        "cache_dtype": cfg.cache_dtype,
        "onthefly_volumes_per_s": count / onthefly_s,
        "cached_volumes_per_s": count / cached_s,
        "speedup": onthefly_s / cached_s,
        "onthefly_ms_per_volume": 1000 * onthefly_s / count,
        "cached_ms_per_volume": 1000 * cached_s / count,
        "max_abs_diff": diff,
    }
