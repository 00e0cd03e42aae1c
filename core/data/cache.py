"""The preprocessing cache: every volume decoded and preprocessed once, then memory-mapped by training.

Layout under ``data.cache_dir``::

    <tag>/config.json                          the preprocessing settings the tag stands for
    <tag>/<split>/volumes/<stem>.<vkey>.npy    one preprocessed volume (D, H, W), float16 or int16
    <tag>/<split>/volumes/<stem>.<vkey>.hu.json     how its stored values were read as HU
    <tag>/<split>/volumes/<stem>.<vkey>.skip.json   why that source file could not be used
    <tag>/<split>/index-<lkey>.json            VolumeName, file, text, labels per usable volume
    <tag>/<split>/summary-<lkey>.json          counts and the skipped files with their reasons

``tag`` hashes the preprocessing settings (spacing, shape, HU window, rescale, dtype)
with the resolved root, so changing any of them selects another folder and
stale data is never served. ``vkey`` hashes one source file's identity (path,
size, mtime) with the metadata that shapes its values (slope, intercept,
spacing), so an edited file or metadata row is redone. ``lkey`` hashes the
listing settings (CSV paths, text fields, subset), so runs that differ only
in those share the volumes. Each volume is written to a temporary file and
renamed into place, so an interrupted ``prepare`` leaves only whole volumes
and the next call resumes with the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.config import DataConfig
from core.data.ctrate import NIFTI_SUFFIX, Skip, SplitListing, VolumeRecord, read_split, text_fields
from core.data.hu import RESCALE_PATHS
from core.data.preprocess import BadVolume, Preprocessing, decode_file, encode, preprocess_array
from core.registry import ConfigError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when preprocessing code changes what a cached volume holds


def _digest(payload: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]


def cache_settings(cfg: DataConfig) -> dict[str, Any]:
    """What a cached volume's values depend on (besides its own source file)."""
    prep = Preprocessing.from_config(cfg)
    return {
        "version": CACHE_VERSION,
        "root": str(Path(cfg.root).resolve()),
        "target_spacing": list(prep.target_spacing),
        "target_shape": list(prep.target_shape),
        "hu_window": list(prep.hu_window),
        "rescale": prep.rescale,
        "cache_dtype": cfg.cache_dtype,
        **({"intensity": prep.intensity} if prep.intensity != "ctclip" else {}),  # the default keeps older tags
    }


def cache_tag(cfg: DataConfig) -> str:
    """The cache folder name for ``cfg``'s preprocessing: readable settings plus a hash of all of them."""
    s = cache_settings(cfg)
    readable = "_".join([
        "x".join(str(v) for v in s["target_shape"]),
        "sp" + "x".join(f"{v:g}" for v in s["target_spacing"]),
        "hu{:g}..{:g}".format(*s["hu_window"]),
        s["cache_dtype"],
    ])
    return f"{readable}-{_digest(s, 10)}"


def cache_path(cfg: DataConfig) -> Path:
    """The folder that holds ``cfg``'s prepared volumes: ``data.cache_dir / cache_tag(cfg)``."""
    return Path(cfg.cache_dir) / cache_tag(cfg)


def listing_key(cfg: DataConfig, split: str) -> str:
    """Hash of the settings that pick a split's volumes and texts (not their preprocessing)."""
    return _digest({
        "volumes": cfg.volume_dirs.get(split), "reports": cfg.reports_csv.get(split),
        "labels": cfg.labels_csv.get(split), "metadata": cfg.metadata_csv.get(split),
        "text_fields": text_fields(cfg, split), "drop_text": cfg.drop_text,
        "subset": [cfg.subset_fraction, cfg.subset_seed, cfg.subset if split == "train" else "seeded"],
    }, 8)


def index_path(cfg: DataConfig, split: str) -> Path:
    """The index file the Dataset reads for ``split``."""
    return cache_path(cfg) / split / f"index-{listing_key(cfg, split)}.json"


def summary_path(cfg: DataConfig, split: str) -> Path:
    """The JSON summary (counts, skipped files) beside ``split``'s index."""
    return cache_path(cfg) / split / f"summary-{listing_key(cfg, split)}.json"


def _write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, and only when the content changes (a no-op prepare touches nothing)."""
    text = json.dumps(payload, indent=1, sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- summaries


@dataclass
class SplitSummary:
    """What ``prepare`` did for one split."""

    split: str
    volumes: int  # usable volumes in the index
    processed: int  # preprocessed by this call
    reused: int  # already in the cache
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count
    skipped_files: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason", "detail"}
    index: str = ""
    rescale: dict[str, int] = field(default_factory=dict)  # how HU were read (hu.RESCALE_PATHS) → volumes

    @property
    def skipped_total(self) -> int:
        """How many candidates were left out, all reasons together."""
        return sum(self.skipped.values())


@dataclass
class PrepareSummary:
    """What ``prepare`` did: the cache folder and one ``SplitSummary`` per split."""

    cache_dir: str
    splits: dict[str, SplitSummary]
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        """Volumes preprocessed by this call (0 when the cache was already complete)."""
        return sum(s.processed for s in self.splits.values())

    @property
    def skipped_count(self) -> int:
        """Skipped inputs over all splits (logged to each run as ``skipped_inputs``)."""
        return sum(s.skipped_total for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {"cache_dir": self.cache_dir, "seconds": self.seconds,
                "splits": {name: asdict(s) for name, s in self.splits.items()}}

    def format(self, max_files: int = 20) -> str:
        """Human-readable lines: per split, counts and the skipped files with their reasons."""
        lines = [f"cache: {self.cache_dir}"]
        for s in self.splits.values():
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.skipped.items())) or "none"
            lines.append(f"{s.split}: {s.volumes} volumes ready ({s.processed} preprocessed now, "
                         f"{s.reused} reused); skipped {s.skipped_total}: {reasons}")
            if s.rescale:
                lines.append(f"  HU read: {rescale_counts(s.rescale)}")
            missing = [f["file"] for f in s.skipped_files if f["reason"] == "missing_file"]
            if missing:
                lines.append(f"  {missing_line(missing)}")
            named = [f for f in s.skipped_files if f["reason"] != "missing_file"]
            lines += [f"  skipped {f['file']}: {f['reason']} {f['detail']}".rstrip() for f in named[:max_files]]
            if len(named) > max_files:
                lines.append(f"  ... and {len(named) - max_files} more in {Path(s.index).parent}")
        return "\n".join(lines)


def rescale_counts(counts: dict[str, int]) -> str:
    """``{"header": 3, "none": 2}`` → "3 by the NIfTI header's scaling, 2 stored values already in HU"."""
    return ", ".join(f"{n} by {RESCALE_PATHS.get(path, path)}" if path != "none" else f"{n} {RESCALE_PATHS[path]}"
                     for path, n in sorted(counts.items()))


def missing_line(names: list[str], first: int = 5) -> str:
    """One line for the listed volumes without a file (a partial download): the count and the first names."""
    shown = ", ".join(names[:first]) + (", ..." if len(names) > first else "")
    return (f"{len(names)} volume(s) listed in the reports CSV have no file under the volume folder "
            f"(a partial download?), skipped as missing_file: {shown}")


# --------------------------------------------------------------------------- work items


@dataclass(frozen=True)
class _Task:
    source: str
    out: str
    marker: str
    slope: float | None
    intercept: float | None
    spacing: tuple[float, float, float] | None
    prep: Preprocessing
    dtype: str


def _stem(name: str) -> str:
    return name[: -len(NIFTI_SUFFIX)] if name.endswith(NIFTI_SUFFIX) else name


def volume_key(record: VolumeRecord) -> str:
    """Identity of one source volume and its metadata: path, size, mtime, slope, intercept, spacing."""
    stat = record.path.stat()
    return _digest([str(record.path.resolve()), stat.st_size, stat.st_mtime_ns,
                    record.slope, record.intercept, record.spacing])


def _hu_note(out: Path) -> Path:
    """The small JSON beside a cached volume that records how its HU were read."""
    return out.with_name(out.name[: -len(".npy")] + ".hu.json")


def _prepare_volume(task: _Task) -> tuple[str, str, str]:
    """Preprocess one file into ``task.out`` (atomically); on a bad file write ``task.marker`` instead.

    Returns ("", "", rescale) on success (rescale: how its HU were read), else (reason, detail, "").
    """
    try:
        decoded = decode_file(task.source, task.prep, task.slope, task.intercept, task.spacing)
        volume = preprocess_array(decoded.hu, decoded.spacing, task.prep)
    except BadVolume as bad:
        _write_json(Path(task.marker), {"reason": bad.reason, "detail": bad.detail})
        return bad.reason, bad.detail, ""
    out = Path(task.out)
    _write_json(_hu_note(out), {"rescale": decoded.rescale})
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, encode(volume, task.dtype))
    os.replace(tmp, out)
    return "", "", decoded.rescale


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


INLINE_BELOW = 32  # with workers=None, fewer volumes than this are done in-process (no pool start-up)


def _run(tasks: list[_Task], workers: int | None, progress: bool) -> dict[str, tuple[str, str, str]]:
    """Run ``tasks`` inline or in worker processes, with a progress bar; returns out path → result."""
    results: dict[str, tuple[str, str, str]] = {}
    if workers is None:
        workers = (os.cpu_count() or 1) if len(tasks) >= INLINE_BELOW else 1
    bar = tqdm(total=len(tasks), desc="prepare", unit="vol", disable=not progress or not tasks)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results[task.out] = _prepare_volume(task)
            bar.update()
    else:
        # forkserver: workers never inherit a parent's OpenMP state (a fork after torch ran can deadlock)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["core.data.cache"])
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_prepare_volume, task): task.out for task in tasks}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return results


# --------------------------------------------------------------------------- prepare


@dataclass
class _Plan:
    listing: SplitListing
    outputs: list[tuple[VolumeRecord, Path, Path]]  # record, volume file, skip marker
    todo: list[_Task]


def _plan(cfg: DataConfig, listing: SplitListing, folder: Path) -> _Plan:
    volumes = folder / "volumes"
    volumes.mkdir(parents=True, exist_ok=True)
    prep = Preprocessing.from_config(cfg)
    outputs, todo = [], []
    for record in listing.records:
        base = f"{_stem(record.name)}.{volume_key(record)}"
        out, marker = volumes / f"{base}.npy", volumes / f"{base}.skip.json"
        outputs.append((record, out, marker))
        if not out.is_file() and not marker.is_file():
            todo.append(_Task(str(record.path), str(out), str(marker), record.slope, record.intercept,
                              record.spacing, prep, cfg.cache_dtype))
    return _Plan(listing, outputs, todo)


def check_free_space(cfg: DataConfig, volumes: int, folder: Path) -> None:
    """Refuse, before any volume is preprocessed, to fill the disk with ``volumes`` preprocessed volumes.

    CT-CLIP's input (240 × 480 × 480 float16) takes 110 MB a volume, so a
    cache prepared with the wrong settings can use up a disk in minutes.
    """
    needed = volumes * int(np.prod(cfg.target_shape)) * np.dtype(cfg.cache_dtype).itemsize
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"data cache '{folder}': {volumes} volumes of {'x'.join(map(str, cfg.target_shape))} {cfg.cache_dtype} "
            f"need {needed / 1e9:.1f} GB but the disk has {free / 1e9:.1f} GB free; free some space, point "
            "data.cache_dir (--cache) elsewhere, or use a smaller data.target_shape (the synthetic preset's: "
            "-c experiments/configs/synthetic-tiny.yaml)"
        )


def _remove_stale(volumes: Path, outputs: list[tuple[VolumeRecord, Path, Path]]) -> None:
    """Delete older versions of the listed volumes (same stem, another vkey) and orphaned temp files."""
    current = {p.name for _, out, marker in outputs for p in (out, marker, _hu_note(out))}
    stems = {_stem(record.name) for record, _, _ in outputs}
    for path in volumes.iterdir():
        stale_version = path.name.split(".")[0] in stems and path.name not in current and ".tmp-" not in path.name
        orphan_tmp = ".tmp-" in path.name and time.time() - path.stat().st_mtime > 3600
        if stale_version or orphan_tmp:
            path.unlink(missing_ok=True)


def _read_hu_note(out: Path) -> str:
    note = _hu_note(out)
    return json.loads(note.read_text()).get("rescale", "unknown") if note.is_file() else "unknown"


def _finish(cfg: DataConfig, split: str, plan: _Plan, results: dict[str, tuple[str, str, str]]) -> SplitSummary:
    """Write the split's index and summary from the finished files; warn once per skipped file, and once
    per split for all the listed volumes without a file."""
    folder = cache_path(cfg) / split
    entries, skips = [], list(plan.listing.skipped)
    for record, out, marker in plan.outputs:
        if out.is_file():
            done = results.get(str(out))
            entries.append({"name": record.name, "file": f"volumes/{out.name}", "text": record.text,
                            "labels": list(record.labels), "source": str(record.path),
                            "source_bytes": record.path.stat().st_size,
                            "rescale": done[2] if done else _read_hu_note(out)})
        else:
            reason, detail = (results.get(str(out)) or (*_read_marker(marker), ""))[:2]
            skips.append(Skip(str(record.path), reason, detail))
    missing = [skip.file for skip in skips if skip.reason == "missing_file"]
    if missing:
        log.warning("%s: %s", split, missing_line(missing))
    for skip in skips:
        if skip.reason != "missing_file":
            log.warning(skip.message())
    rescale = dict(sorted(Counter(entry["rescale"] for entry in entries).items()))
    if rescale:
        log.info("%s: HU read: %s", split, rescale_counts(rescale))
    processed = sum(1 for task in plan.todo if not results[task.out][0])
    summary = SplitSummary(
        split=split, volumes=len(entries), processed=processed, reused=len(entries) - processed,
        skipped=dict(sorted(Counter(s.reason for s in skips).items())),
        skipped_files=[{"file": s.file, "reason": s.reason, "detail": s.detail} for s in skips],
        index=str(index_path(cfg, split)), rescale=rescale,
    )
    _write_json(index_path(cfg, split), {
        "split": split, "tag": cache_tag(cfg), "listing": listing_key(cfg, split),
        "shape": list(cfg.target_shape), "dtype": cfg.cache_dtype, "volumes": entries,
    })
    _write_json(summary_path(cfg, split), {
        "split": split, "cache": str(folder), "volumes": summary.volumes, "skipped": summary.skipped,
        "skipped_files": summary.skipped_files, "rescale": summary.rescale,
    })
    if cfg.subset_fraction >= 1.0:
        _remove_stale(folder / "volumes", plan.outputs)
    return summary


def _read_marker(marker: Path) -> tuple[str, str]:
    data = json.loads(marker.read_text())
    return data["reason"], data.get("detail", "")


def prepare(cfg: DataConfig, splits: tuple[str, ...] | list[str] = ("train", "valid"), workers: int | None = None,
            progress: bool = True) -> PrepareSummary:
    """Make sure every volume of ``splits`` is preprocessed into the cache; a no-op when it already is.

    All splits are listed (and their set-up checked, raising ConfigError)
    before any volume is touched. Volumes run in ``workers`` processes (None:
    one per CPU, or in-process when fewer than ``INLINE_BELOW`` are left to do). Each
    skipped input is logged once as a warning and counted in the returned
    summary, which is also written beside the index as JSON.
    """
    start = time.perf_counter()
    listings = {split: read_split(cfg, split) for split in splits}
    root = cache_path(cfg)
    _write_json(root / "config.json", cache_settings(cfg))
    plans = {split: _plan(cfg, listing, root / split) for split, listing in listings.items()}
    check_free_space(cfg, sum(len(plan.todo) for plan in plans.values()), root)
    results = _run([task for plan in plans.values() for task in plan.todo], workers, progress)
    summaries = {split: _finish(cfg, split, plan, results) for split, plan in plans.items()}
    log.info("data cache %s: %s", root, "; ".join(
        f"{s.split} {s.volumes} volumes ({s.processed} preprocessed now, {s.skipped_total} skipped)"
        for s in summaries.values()))
    return PrepareSummary(str(root), summaries, time.perf_counter() - start)


# --------------------------------------------------------------------------- readers of a prepared cache


def load_index(cfg: DataConfig, split: str) -> dict[str, Any]:
    """The prepared index of ``split`` for ``cfg``; ConfigError with the command to run when absent."""
    path = index_path(cfg, split)
    if not path.is_file():
        raise ConfigError(
            f"no prepared cache for split '{split}' at '{path.parent}' (settings: {cache_tag(cfg)}); "
            f"run `ctlab data prepare --root {cfg.root} --cache {cfg.cache_dir}` with the same data.* settings, "
            f"or call core.data.prepare(cfg.data)"
        )
    return json.loads(path.read_text())


def load_summary(cfg: DataConfig, split: str) -> dict[str, Any] | None:
    """The summary JSON that the last ``prepare`` wrote for ``split`` (None when not prepared)."""
    path = summary_path(cfg, split)
    return json.loads(path.read_text()) if path.is_file() else None


def data_fingerprint(cfg: DataConfig, split: str) -> str:
    """A stable 16-hex-digit hash of a prepared split's contents, for the ``data_fingerprint`` run tag.

    It covers the preprocessing settings and, per volume, its name, source size, text and labels;
    not paths or file times, so the same data prepared on two machines gets the same fingerprint.
    """
    index = load_index(cfg, split)
    settings = {k: v for k, v in cache_settings(cfg).items() if k != "root"}
    return _digest([settings, [[v["name"], v["source_bytes"], v["text"], v["labels"]] for v in index["volumes"]]])
