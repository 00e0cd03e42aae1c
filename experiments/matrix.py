"""Ablation matrices: a base config × axes − excludes + includes, expanded to cells.

A matrix YAML::

    name: smoke
    base: configs/synthetic-tiny.yaml      # path (relative to this file) or an inline config mapping
    overrides: {train.max_steps: 40}       # dotted overrides on the base, for every cell
    axes:                                  # config key → values; the cells are their product
      model.attention: [standard, sdpa]
      model.loss: [clip, siglip]
    exclude: [{model.attention: standard, model.loss: siglip}]   # partial assignments to drop
    include: [{model.attention: sdpa, model.norm: rmsnorm}]      # extra cells
    repeats: 1                             # seeds per cell: train.seed + 0 .. repeats-1
    baseline: {model.attention: standard, model.loss: clip}     # the row others are compared with
    slurm: {partition: gpu, time: "12:00:00"}                    # --launcher slurm settings (experiments/slurm.py)

Each cell's id is ``config_id`` of its resolved config, so the same settings
always map to the same cell, whatever matrix they appear in. A cell whose
encoder cannot take an axis value (attention for a conv net) is kept in the
list as skipped, with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import (
    Config,
    TrackingConfig,
    apply_overrides,
    config_from_dict,
    config_id,
    config_to_dict,
    flatten,
    load_yaml,
)
from core.encoders.base import unsupported_axes
from core.naming import component_values, config_label
from core.registry import ConfigError, closest
from experiments.slurm import slurm_options

MATRIX_KEYS = ("name", "description", "base", "overrides", "axes", "exclude", "include", "repeats", "baseline",
               "slurm")

@dataclass
class Cell:
    """One resolved configuration of a matrix."""

    cell_id: str
    label: str
    assignment: dict[str, Any]
    config: Config
    skip_reason: str | None = None

    @property
    def runnable(self) -> bool:
        """Whether the cell is trained (not skipped)."""
        return self.skip_reason is None


@dataclass
class Matrix:
    """A parsed matrix file and its cells."""

    name: str
    path: Path | None
    axes: dict[str, list[Any]]
    cells: list[Cell]
    baseline: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def runnable(self) -> list[Cell]:
        """The cells to train."""
        return [c for c in self.cells if c.runnable]

    def baseline_cell(self) -> Cell | None:
        """The cell matching ``baseline`` (else the first runnable cell)."""
        for cell in self.runnable:
            if all(cell.assignment.get(k) == v for k, v in self.baseline.items()):
                return cell
        return self.runnable[0] if self.runnable else None


def cell_label(cfg: Config) -> str:
    """The row name of a config in result tables, e.g. "SA+GELU+LN, softmax" (other encoders prefixed)."""
    return config_label(component_values(flatten(config_to_dict(cfg))))


def _check_keys(data: dict[str, Any], path: Path | None) -> None:
    for key in data:
        if key not in MATRIX_KEYS:
            raise ConfigError(f"matrix {path or ''}: unknown key '{key}'{closest(key, MATRIX_KEYS)} "
                              f"(valid keys: {', '.join(MATRIX_KEYS)})")


def _base_config(data: dict[str, Any], path: Path | None) -> dict[str, Any]:
    base = data.get("base", {})
    if isinstance(base, str):
        base_path = Path(base)
        if not base_path.is_absolute() and path is not None:
            base_path = path.parent / base_path
        base = load_yaml(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"matrix {path or ''}: 'base' must be a config path or mapping")
    return apply_overrides(base, data.get("overrides") or {})


def _matches(assignment: dict[str, Any], partial: dict[str, Any]) -> bool:
    return all(assignment.get(k) == v for k, v in partial.items())


def _cell(base: dict[str, Any], assignment: dict[str, Any], name: str) -> Cell:
    try:
        cfg = config_from_dict(apply_overrides(base, assignment))
    except ConfigError as err:
        raise ConfigError(f"matrix '{name}', cell {assignment}: {err}") from None
    if cfg.tracking.experiment == TrackingConfig.experiment:  # the default: one experiment per matrix
        cfg.tracking.experiment = name
    reasons = unsupported_axes(cfg.model)
    cid = config_id(cfg)
    cfg.name = f"{name}-{cid}"
    return Cell(cid, cell_label(cfg), assignment, cfg, "; ".join(reasons) or None)


def load_matrix(source: str | Path | dict[str, Any]) -> Matrix:
    """Parse a matrix file (or mapping) and expand it to cells; every key and value is checked first."""
    path = None if isinstance(source, dict) else Path(source)
    data = source if isinstance(source, dict) else load_yaml(path)
    _check_keys(data, path)
    slurm_options(data.get("slurm"))  # cluster settings are checked even when the matrix runs locally
    name = str(data.get("name") or (path.stem if path else "matrix"))
    base = _base_config(data, path)
    axes = {str(k): list(v) if isinstance(v, list) else [v] for k, v in (data.get("axes") or {}).items()}
    excludes = data.get("exclude") or []
    repeats = int(data.get("repeats", 1))
    if repeats < 1:
        raise ConfigError(f"matrix '{name}': repeats must be >= 1")
    assignments = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())] if axes else []
    assignments = [a for a in assignments if not any(_matches(a, ex) for ex in excludes)]
    assignments += [dict(extra) for extra in data.get("include") or [] if dict(extra) not in assignments]
    if not assignments:
        raise ConfigError(f"matrix '{name}': no cells — declare 'axes' or 'include'")
    if tracked := sorted({key for a in assignments for key in a if key.startswith("tracking.")}):
        raise ConfigError(f"matrix '{name}': {', '.join(tracked)} cannot vary between cells: tracking settings "
                          "belong to the whole matrix (one store and experiment with its parent run, and a cell's id "
                          "leaves them out); set them in 'base'")
    base_seed = int(apply_overrides(base, {}).get("train", {}).get("seed", 0))
    cells, seen = [], set()
    for assignment in assignments:
        for repeat in range(repeats):
            full = {**assignment, **({"train.seed": base_seed + repeat} if repeats > 1 else {})}
            cell = _cell(base, full, name)
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                cells.append(cell)
    baseline = dict(data.get("baseline") or {})
    varied = {key for a in assignments for key in a}
    for key in baseline:
        if key not in varied:
            raise ConfigError(f"matrix '{name}': baseline key '{key}' is not an axis{closest(key, sorted(varied))}")
    return Matrix(name, path, axes, cells, baseline, data)


def expand_matrix(path: str | Path) -> list[Cell]:
    """The cells of a matrix file (runnable and skipped)."""
    return load_matrix(path).cells
