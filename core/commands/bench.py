"""``ctlab bench``: efficiency tables — the component zoo (default), one config or a matrix, two configs
side by side, the data pipeline, and every image encoder."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from core.bench import compare
from core.bench_tables import (
    PAPER_INPUT_SHAPE,
    encoder_configs,
    encoder_size,
    paper_reference,
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


def _timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch (default: 2)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per config; the median is kept (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default: 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--out", default="reports/bench", help="folder for the .md and .csv (default: reports/bench)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _shape_options(parser: argparse.ArgumentParser, preset: str) -> None:
    parser.add_argument("--preset", default=preset, help=f"encoder preset (default: {preset})")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=[32, 64, 64],
                        help="input volume (slices, rows, columns) (default: 32 64 64)")
    parser.add_argument("--text-encoder", default="tiny-random",
                        help="text encoder of the CLIP model (default: tiny-random, for speed)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. train.precision=bf16 (repeatable)")


def _zoo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="ctvit", help="image encoder whose axes are combined (default: ctvit)")
    _shape_options(parser, "tiny")
    _timing_options(parser)


def _items_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help=config_help)
    _timing_options(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ctlab bench`` and its tables: zoo (the default), model, train, data, encoders."""
    parser = subparsers.add_parser(
        "bench", help="efficiency bench: params, GFLOPs, peak memory, forward/backward/step time",
        description="Efficiency bench. With no table named, runs `zoo`: every attention × norm × mlp combination "
                    "of one encoder. Times are medians of repeats after a warm-up, alternating across configs.")
    _zoo_options(parser)
    parser.set_defaults(func=run_zoo)
    tables = parser.add_subparsers(dest="table", metavar="TABLE")

    zoo = tables.add_parser("zoo", help="every attention × norm × mlp combination of one encoder (the default)",
                            description="Params, GFLOPs, forward/backward/step ms and peak memory of every "
                                        "attention × norm × mlp combination; writes OUT/zoo.md and .csv.")
    _zoo_options(zoo)
    zoo.set_defaults(func=run_zoo)

    model = tables.add_parser("model", help="one config (or every cell of a matrix)",
                              description="Bench one config file with overrides, or every cell of a matrix YAML "
                                          "(--matrix; the overrides apply to every cell).")
    _items_options(model, "a config YAML, then dotted overrides (model.attention=sdpa ...)")
    model.add_argument("--matrix", metavar="FILE", help="a matrix YAML: bench all its cells side by side")
    model.add_argument("--track", action="store_true",
                       help="also log one run per config to the MLflow experiment 'efficiency' (read by ctlab report)")
    model.add_argument("--tracking-uri", help="MLflow tracking URI for --track (default: sqlite:///mlflow.db)")
    model.set_defaults(func=run_model)

    train = tables.add_parser("train", help="two configs side by side: memory ratio, step speed-up, samples/s",
                              description="Bench CONFIG against --vs BASELINE in one process, repeats alternating; "
                                          "writes OUT/train-<config>-vs-<baseline>.md and .csv.")
    _items_options(train, "a config YAML, then dotted overrides applied to both configs")
    train.add_argument("--vs", required=True, metavar="BASELINE", help="the baseline config YAML")
    train.set_defaults(func=run_train)

    data = tables.add_parser("data", help="the data pipeline's throughput (core.data.bench)",
                             description="Read N items of a split through the data pipeline and report its speed.")
    data.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help="a config YAML, then dotted overrides")
    data.add_argument("--split", default="train", help="split to read (default: train)")
    data.add_argument("-n", type=int, default=32, help="items to read (default: 32)")
    data.add_argument("--out", default="reports/bench", help="folder for the .md and .csv (default: reports/bench)")
    data.set_defaults(func=run_data)

    encoders = tables.add_parser("encoders", help="every registered image encoder: params, GFLOPs, fwd/bwd ms",
                                 description="Every registered image encoder at one preset (its default when it has "
                                             "no such preset), beside the DCFormer paper's Params and GFLOPs.")
    _shape_options(encoders, "tiny")
    _timing_options(encoders)
    encoders.add_argument("--flops-only", action="store_true",
                          help="params and GFLOPs only, counted on the meta device (no compute, any --shape, "
                               "e.g. the paper's 256 512 512)")
    encoders.set_defaults(func=run_encoders)


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
    counts = Counter(cell.label for cell in matrix.cells)
    labels = {cell.cell_id: cell.label if counts[cell.label] == 1 else f"{cell.label} [{cell.cell_id}]"
              for cell in matrix.cells}
    configs, skipped = {}, {}
    for cell in matrix.cells:
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
        from core.bench import bench_to_mlflow_rows
        from core.tracking import log_efficiency_runs

        matrix = matrix_name if args.matrix else None
        ids = log_efficiency_runs(bench_to_mlflow_rows(comparison, matrix=matrix), args.tracking_uri)
        print(f"logged {len(ids)} efficiency run(s) to MLflow experiment 'efficiency'")
    frame = results_frame(comparison, skipped)
    columns = ["label", "encoder", "preset", "attention", "norm", "mlp", "input_shape", "trainable_m", *FIGURES,
               "samples_per_s", *(RATIOS if len(configs) > 1 else []), "status"]
    return _report(frame, columns, args, name, run_notes(comparison))


def run_train(args: argparse.Namespace) -> int:
    """CONFIG against --vs BASELINE: peak memory ratio, step speed-up, samples/s."""
    path, overrides = _split_items(args.items)
    if path is None:
        raise ConfigError("ctlab bench train needs a config YAML and --vs BASELINE_YAML")
    cfg, base = load_config(path, overrides), load_config(args.vs, overrides)
    label, base_label = cfg.name, base.name
    if label == base_label:
        label, base_label = Path(path).stem, Path(args.vs).stem
    if label == base_label:
        base_label = f"{base_label} (baseline)"
    comparison = compare({base_label: base, label: cfg}, base_label, **_timing(args))
    frame = results_frame(comparison)
    columns = ["label", "peak_memory_mb", "memory_ratio", "step_ms", "step_speedup", "samples_per_s",
               "visual_fwd_ms", "visual_fwd_ratio", "visual_bwd_ms", "visual_bwd_ratio", "params_m", "status"]
    return _report(frame, columns, args, _file_name("train", label, "vs", base_label), run_notes(comparison))


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
    notes = ["# image encoders", *notes,
             "paper columns: DCFormer (Ates et al., arXiv:2502.05091) Params and GFLOPs at "
             f"{'x'.join(map(str, PAPER_INPUT_SHAPE))} (D x H x W); its GFLOPs count multiply-accumulates "
             "(flopth / fvcore, the authors' counters), so compare them with GMACs = GFLOPs / 2"]
    columns = ["label", "preset", "input_shape", "image_params_m", "gflops", "gmacs", "visual_fwd_ms",
               "visual_bwd_ms", "fwd_bwd_ms", "peak_memory_mb", "paper", "paper_params_m", "paper_gflops", "status"]
    return _report(frame, columns, args, _file_name("encoders", args.preset or "default"), notes)
