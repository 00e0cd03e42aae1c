"""What each ``ctlab bench`` table measures and writes: the component zoo, one config or a matrix, two configs
side by side (and whether their training waits on data), the performance options, CT-ViT's patch embedding, the
data pipeline and every image encoder. Each ``run_*`` takes the parsed command line (``core.commands.bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from core.bench.model import compare
from core.bench.options import BASELINE, OPTIONS, against_modern, max_batch_table, option_configs
from core.bench.probes import bench_device, device_name
from core.bench.tables import (
    PAPER_INPUT_SHAPE,
    base_overrides,
    encoder_configs,
    encoder_fvcore_size,
    encoder_size,
    implementation,
    paper_family,
    paper_reference,
    params_basis,
    results_frame,
    run_notes,
    write_report,
    zoo_configs,
)
from core.config import Config, apply_overrides, config_from_dict, config_to_dict, flatten, load_config
from core.encoders import encoder_axes
from core.registry import ConfigError

FIGURES = ["image_params_m", "params_m", "gflops", "visual_fwd_ms", "visual_bwd_ms", "fwd_bwd_ms", "step_ms",
           "peak_memory_mb"]
RATIOS = ["memory_ratio", "step_speedup", "visual_fwd_ratio", "visual_bwd_ratio"]
DATA_COLUMNS = ["label", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "data_wait_ms",
                "data_wait_ms_max", "step_ms", "wait_fraction", "samples_per_s"]


# --------------------------------------------------------------------------- helpers


def _split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``["cfg.yaml", "a.b=1"]`` → ``("cfg.yaml", ["a.b=1"])``; at most one config path."""
    paths = [i for i in items if "=" not in i]
    if len(paths) > 1:
        raise ConfigError(f"expected one config file, got {', '.join(paths)}; overrides look like KEY=VALUE")
    return (paths[0] if paths else None), [i for i in items if "=" in i]


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-")


def _timing(args: argparse.Namespace) -> dict[str, Any]:
    """compare()'s keyword arguments from the timing options (and the thread count set for torch)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"batch_size": args.batch, "repeats": args.repeats, "warmup": args.warmup, "device": args.device,
            "progress": args.progress}


def _report(frame: pd.DataFrame, columns: Sequence[str], args: argparse.Namespace, name: str,
            notes: Sequence[str]) -> int:
    text, paths = write_report(frame, columns, args.out, name, notes)
    print(text)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


# --------------------------------------------------------------------------- tables


def run_zoo(args: argparse.Namespace) -> int:
    """Every attention × norm × mlp combination of one encoder, side by side."""
    configs, skipped = zoo_configs(args.encoder, args.preset, args.shape, args.text_encoder, args.override)
    comparison = compare(configs, next(iter(configs)), **_timing(args))
    frame = results_frame(comparison, skipped)
    for i, axis in enumerate(encoder_axes(args.encoder)):  # skipped rows: the axis values from their label
        frame[axis] = frame[axis].fillna(frame["label"].str.split("+").str[i])
    columns = ["attention", "norm", "mlp", *FIGURES, "step_speedup", "status"]
    name = "zoo" if args.encoder == "ctvit" else f"zoo-{args.encoder}"
    notes = [f"# {args.encoder} ({args.preset}) component zoo", *run_notes(comparison)]
    return _report(frame, columns, args, name, notes)


def first_seed_cells(cells: list) -> list:
    """One cell per configuration: a matrix's ``repeats`` differ only in ``train.seed``, which costs nothing."""
    seen, kept = set(), []
    for cell in cells:
        key = tuple(sorted((k, repr(v)) for k, v in cell.assignment.items() if k != "train.seed"))
        if key not in seen:
            seen.add(key)
            kept.append(cell)
    return kept


def _matrix_configs(path: str, overrides: list[str]) -> tuple[dict[str, Config], dict[str, str], str, str]:
    """The runnable cells of a matrix (overrides applied), its skipped cells with why, its baseline and name."""
    try:
        from experiments.matrix import load_matrix
    except ImportError as err:
        raise ConfigError(
            f"--matrix needs experiments.matrix, which cannot be imported here ({err}); "
            "bench one config with `ctlab bench model CONFIG [KEY=VALUE ...]`"
        ) from None
    matrix = load_matrix(path)
    cells = first_seed_cells(matrix.cells)
    counts = Counter(cell.label for cell in cells)
    labels = {cell.cell_id: cell.label if counts[cell.label] == 1 else f"{cell.label} [{cell.cell_id}]"
              for cell in cells}
    configs, skipped = {}, {}
    for cell in cells:
        if cell.skip_reason:
            skipped[labels[cell.cell_id]] = cell.skip_reason
        else:
            configs[labels[cell.cell_id]] = config_from_dict(apply_overrides(config_to_dict(cell.config), overrides))
    baseline = matrix.baseline_cell()
    if baseline is None:
        raise ConfigError(f"matrix '{path}' has no runnable cell to bench")
    return configs, skipped, labels[baseline.cell_id], matrix.name


def run_model(args: argparse.Namespace) -> int:
    """One config, or every cell of a matrix side by side (ratios to the matrix's baseline cell)."""
    path, overrides = _split_items(args.items)
    if args.matrix:
        if path is not None:
            raise ConfigError(f"give either a config ({path}) or --matrix, not both")
        configs, skipped, baseline, matrix_name = _matrix_configs(args.matrix, overrides)
        name = _file_name("model", matrix_name)
    else:
        if path is None:
            raise ConfigError("ctlab bench model needs a config YAML (or --matrix FILE)")
        cfg = load_config(path, overrides)
        configs, skipped, baseline, name = {cfg.name: cfg}, {}, cfg.name, _file_name("model", cfg.name)
    comparison = compare(configs, baseline, **_timing(args))
    if args.track:
        _track(comparison, args.tracking_uri, matrix_name if args.matrix else None)
    frame = results_frame(comparison, skipped)
    columns = ["label", "encoder", "preset", "attention", "norm", "mlp", "input_shape", "trainable_m", *FIGURES,
               "samples_per_s", *(RATIOS if len(configs) > 1 else []), "status"]
    return _report(frame, columns, args, name, run_notes(comparison))


def _candidate_overrides(args: argparse.Namespace) -> list[str]:
    """``bench train``'s toggles for the candidate as dotted overrides."""
    toggles = list(args.candidate)
    if args.precision:
        toggles.append(f"train.precision={args.precision}")
    if args.compile:
        toggles.append("train.compile=true")
    if args.grad_checkpointing:
        toggles.append("model.grad_checkpointing=true")
    return toggles


def _track(comparison: dict[str, Any], uri: str | None, matrix: str | None = None) -> None:
    from core.bench.model import bench_to_mlflow_rows
    from core.tracking import log_efficiency_runs

    ids = log_efficiency_runs(bench_to_mlflow_rows(comparison, matrix=matrix), uri)
    print(f"logged {len(ids)} efficiency run(s) to MLflow experiment 'efficiency'")


def run_train(args: argparse.Namespace) -> int:
    """CONFIG against --vs BASELINE: peak memory ratio, step speed-up, samples/s; with --data, the share of
    step time each spends waiting on the real DataLoader."""
    path, overrides = _split_items(args.items)
    if path is None:
        raise ConfigError("ctlab bench train needs a config YAML and --vs BASELINE_YAML")
    cfg, base = load_config(path, [*overrides, *_candidate_overrides(args)]), load_config(args.vs, overrides)
    label, base_label = cfg.name, base.name
    if label == base_label:
        label, base_label = Path(path).stem, Path(args.vs).stem
    if label == base_label:
        base_label = f"{base_label} (baseline)"
    cfg, base = (dataclasses.replace(c, name=n) for c, n in ((cfg, label), (base, base_label)))
    comparison = compare({base_label: base, label: cfg}, base_label, **_timing(args))
    if args.track:
        _track(comparison, args.tracking_uri)
    frame = results_frame(comparison)
    columns = ["label", "precision", "peak_memory_mb", "memory_ratio", "step_ms", "step_ms_min", "step_ms_max",
               "step_speedup", "step_speedup_min", "step_speedup_max", "samples_per_s", "visual_fwd_ms",
               "visual_fwd_ratio", "visual_bwd_ms", "visual_bwd_ratio", "params_m", "status"]
    name = _file_name("train", label, "vs", base_label)
    notes = run_notes(comparison, [f"device name: {device_name(args.device)}"])
    code = _report(frame, columns, args, name, notes)
    if args.data:
        from core.bench.data_wait import data_wait

        rows = [row for c in (base, cfg) for row in data_wait(c, args.workers, args.data_steps,
                                                                   device=args.device, progress=args.progress)]
        first = rows[0]
        data_notes = [f"# waiting on data: {label} vs {base_label}",
                      f"device {first['device']} ({device_name(args.device)}), batch {first['batch_size']}, input "
                      f"{first['input_shape']}, {first['steps']} timed training steps per setting after "
                      f"{first['warmup']} untimed, {first['steps_per_epoch']} steps per epoch (epoch starts "
                      "included); wait = time in the DataLoader's next(), step = from that request to the loss "
                      "read back; wait_fraction = total wait / total step time"]
        code = code or _report(pd.DataFrame(rows), DATA_COLUMNS, args, f"{name}-data", data_notes)
    return code


def run_options(args: argparse.Namespace) -> int:
    """Baseline, modern, and the modern configuration with each performance option, side by side."""
    base = base_overrides(args.encoder, args.preset, args.shape, args.text_encoder) + list(args.override)
    configs = option_configs(base, args.options, args.precision, args.extra_baseline)
    timing = _timing(args)
    shape = "x".join(map(str, args.shape))
    where = device_name(args.device)
    name = args.name or _file_name("options", args.encoder, args.preset or "default", shape, args.precision,
                                   bench_device(args.device).type)
    if args.max_batch_only and not args.max_batch:
        raise ConfigError("--max-batch-only needs --max-batch LIMIT")
    code = 0
    if not args.max_batch_only:
        comparison = compare(configs, BASELINE, **timing)
        frame = results_frame(comparison)
        verdicts = against_modern(comparison)
        for key in ("memory_vs_modern", "speedup_vs_modern", "pays"):
            frame[key] = frame["label"].map(lambda label, k=key: verdicts.get(label, {}).get(k))
        notes = [f"# {args.encoder} ({args.preset}) at {shape}: performance options on {where}",
                 *run_notes(comparison, [f"{BASELINE} = {configs[BASELINE].model.attention} attention, "
                                         f"{configs[BASELINE].model.mlp} feed-forward, {configs[BASELINE].model.norm}; "
                                         f"options: {', '.join(f'{k} = {OPTIONS[k]}' for k in args.options)}; "
                                         "memory_vs_modern / speedup_vs_modern read each option against the modern "
                                         "row; pays = cuts peak memory or step time there by more than 3 %"])]
        columns = ["label", "precision", "peak_memory_mb", "memory_ratio", "step_ms", "step_ms_min", "step_ms_max",
                   "step_speedup", "step_speedup_min", "step_speedup_max", "samples_per_s", "visual_fwd_ms",
                   "visual_bwd_ms", "memory_vs_modern", "speedup_vs_modern", "pays", "status"]
        code = _report(frame, columns, args, name, notes)
    if args.max_batch:
        unknown = [label for label in args.max_batch_rows or () if label not in configs]
        if unknown:
            raise ConfigError(f"--max-batch-rows: no row {', '.join(map(repr, unknown))}; rows: "
                              f"{', '.join(map(repr, configs))}")
        chosen = {label: cfg for label, cfg in configs.items()
                  if not args.max_batch_rows or label in args.max_batch_rows}
        rows = max_batch_table(chosen, BASELINE, args.max_batch, repeats=args.repeats, warmup=args.warmup,
                               device=args.device, progress=args.progress)
        table = pd.DataFrame(list(rows.values()))
        batch_notes = [f"# {args.encoder} ({args.preset}) at {shape}: each config at its largest batch on {where}",
                       f"largest batch <= {args.max_batch} (doubling, then bisecting to 1/16); each config alone on "
                       f"the device; step = median of {args.repeats} full training steps after {args.warmup} "
                       f"warm-up; throughput_ratio = samples/s over {BASELINE}'s at its own largest batch"]
        code = code or _report(table, ["label", "max_batch", "peak_memory_mb", "step_ms", "samples_per_s",
                                       "throughput_ratio", "status"], args, f"{name}-max-batch", batch_notes)
    return code


def run_patch_embed(args: argparse.Namespace) -> int:
    """CT-ViT's patch embedding alone, linear vs conv."""
    from core.bench.options import patch_embed_table

    if args.threads:
        torch.set_num_threads(args.threads)
    base = [*base_overrides("ctvit", args.preset, args.shape, "tiny-random"), f"model.norm={args.norm}",
            "model.encoder_args.pool=mean"]
    frame = pd.DataFrame(patch_embed_table(base, args.precisions, args.batch, args.repeats, args.device))
    shape = "x".join(map(str, args.shape))
    notes = [f"# CT-ViT ({args.preset}) patch embedding at {shape}, batch {args.batch}, {args.norm} pre-norm, "
             f"on {device_name(args.device)}",
             f"median of {args.repeats} repeats after one warm-up; peak = tensor bytes allocated and alive at once "
             "over forward + backward beyond the input; kept = bytes saved for backward (input volume not counted); "
             "volume = one fp32 input batch"]
    columns = ["label", "volume_mb", "fwd_ms", "bwd_ms", "peak_memory_mb", "saved_mb"]
    return _report(frame, columns, args, _file_name("patch-embed", args.preset, shape, bench_device(args.device).type),
                   notes)


def run_data(args: argparse.Namespace) -> int:
    """Throughput of the data pipeline, from ``core.data.bench.bench_data``."""
    path, overrides = _split_items(args.items)
    cfg = load_config(path, overrides)
    try:
        from core.data.bench import bench_data
    except ImportError as err:
        raise ConfigError(
            f"ctlab bench data needs core.data.bench.bench_data, which cannot be imported ({err})"
        ) from None
    figures = flatten(bench_data(cfg.data, split=args.split, n=args.n))
    frame = pd.DataFrame({"metric": list(figures), "value": list(figures.values())})
    notes = [f"# data pipeline: split {args.split}, {args.n} items, root {cfg.data.root}"]
    return _report(frame, ["metric", "value"], args, _file_name("data", args.split), notes)


def run_encoders(args: argparse.Namespace) -> int:
    """Every registered image encoder at one preset, beside the DCFormer paper's Params / GFLOPs."""
    configs, skipped = encoder_configs(args.preset, args.shape, args.text_encoder, args.override)
    if args.flops_only:
        rows = [encoder_size(cfg) for cfg in tqdm(configs.values(), desc="encoders", disable=not args.progress)]
        frame = pd.DataFrame(rows).assign(status="ok", image_params_m=lambda f: f["image_params_total"] / 1e6)
        frame = pd.concat([frame, pd.DataFrame([{"label": k, "status": f"skipped: {v}"} for k, v in skipped.items()])],
                          ignore_index=True)
        notes = [f"input {'x'.join(map(str, args.shape))}; GFLOPs = image-encoder forward per volume, "
                 "counted on the meta device"]
    else:
        baseline = "ctvit" if "ctvit" in configs else next(iter(configs))
        comparison = compare(configs, baseline, **_timing(args))
        frame = results_frame(comparison, skipped)
        notes = run_notes(comparison)
    frame["encoder"] = frame["label"]  # one config per encoder, labelled with its name (skipped ones too)
    presets = frame["preset"] if "preset" in frame else pd.Series([None] * len(frame))
    papers = [paper_reference(e, p if isinstance(p, str) else None) for e, p in zip(frame["encoder"], presets,
                                                                                       strict=True)]
    frame["paper"] = [p[0] if p else None for p in papers]
    frame["paper_params_m"] = [p[1] if p else None for p in papers]
    frame["paper_gflops"] = [p[2] if p else None for p in papers]
    frame["gmacs"] = frame["gflops"] / 2 if "gflops" in frame else None
    fvcore = {label: encoder_fvcore_size(cfg) for label, cfg in configs.items()}
    frame["gmacs_fvcore"] = [fvcore.get(label, {}).get("gmacs_fvcore") for label in frame["label"]]
    frame["image_params_proj_m"] = [fvcore[label]["image_params_proj"] / 1e6 if label in fvcore else None
                                    for label in frame["label"]]
    frame["paper_params_basis"] = [
        params_basis(m * 1e6, p * 1e6, paper) if label in fvcore else None
        for label, m, p, paper in zip(frame["label"], frame["image_params_m"], frame["image_params_proj_m"],
                                      frame["paper_params_m"], strict=True)]
    frame["implementation"] = [implementation(e) for e in frame["encoder"]]
    frame["paper_family"] = [paper_family(e) for e in frame["encoder"]]
    notes = ["# image encoders", *notes,
             "paper columns: DCFormer (Ates et al., arXiv:2502.05091) Params and GFLOPs at "
             f"{'x'.join(map(str, PAPER_INPUT_SHAPE))} (D x H x W); its GFLOPs are fvcore's count (one "
             "multiply-add = 1, and the train-mode BatchNorms at 5 x their input elements): compare them with "
             "'GMACs fvcore'; 'GMACs' = GFLOPs / 2 counts convolutions and matrix products only",
             "params: 'image params' is the encoder, '+ projection' adds the bias-free Linear to the latent "
             "(model.latent_dim); 'paper params are' says which of the two the paper's figure rounds to",
             "implementation: ConvNeXt3D, PoolFormer3D, ViT3D and hybrid are our 3D versions (DCFormer's "
             "repository holds only the paper's numbers for its baselines); the paper's rows of each family "
             "are listed beside ours"]
    columns = ["label", "preset", "input_shape", "image_params_m", "image_params_proj_m", "gflops", "gmacs",
               "gmacs_fvcore", "visual_fwd_ms", "visual_bwd_ms", "fwd_bwd_ms", "peak_memory_mb", "paper",
               "paper_params_m", "paper_params_basis", "paper_gflops", "implementation", "paper_family", "status"]
    return _report(frame, columns, args, _file_name("encoders", args.preset or "default"), notes)
