"""Hyper-parameter tuning: the matrix machinery with Optuna's TPE sampler and a pruner.

A tuning YAML::

    name: smoke-tune
    base: configs/synthetic-tiny.yaml
    overrides: {train.max_steps: 30}
    n_trials: 8
    metric: zeroshot_auroc                 # logged per epoch; fed to the pruner
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 1}
    space:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      train.warmup_steps: {type: int, low: 0, high: 20}
      model.logit_scale_init: {type: float, low: 0.0, high: 3.0}
      train.batch_size: {type: categorical, choices: [4, 8]}

Every trial is an MLflow child run of one ``tune`` parent run; the best
trial's resolved config is written out as YAML.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from core.config import apply_overrides, config_from_dict, load_yaml, save_config
from core.registry import ConfigError, Registry, closest
from core.tracking import Tracker, find_runs
from experiments.launcher import LaunchOptions, open_storage

log = logging.getLogger(__name__)
TUNE_KEYS = ("name", "description", "base", "overrides", "n_trials", "metric", "pruner", "space")
PRUNERS = Registry("pruner")
PRUNERS.register("median")(optuna.pruners.MedianPruner)
PRUNERS.register("percentile")(optuna.pruners.PercentilePruner)
PRUNERS.register("hyperband")(optuna.pruners.HyperbandPruner)
PRUNERS.register("none")(optuna.pruners.NopPruner)
SUGGEST = {
    "float": lambda trial, key, spec: trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                                          log=bool(spec.get("log", False))),
    "int": lambda trial, key, spec: trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                                      log=bool(spec.get("log", False))),
    "categorical": lambda trial, key, spec: trial.suggest_categorical(key, list(spec["choices"])),
}


@dataclass
class TuneSpec:
    """A parsed tuning file."""

    name: str
    base: dict[str, Any]
    space: dict[str, dict[str, Any]]
    n_trials: int
    metric: str
    pruner: dict[str, Any]


def load_tune(path: str | Path) -> TuneSpec:
    """Parse and check a tuning YAML: keys, search-space types and every key against the config."""
    path = Path(path)
    data = load_yaml(path)
    for key in data:
        if key not in TUNE_KEYS:
            raise ConfigError(f"tune file {path}: unknown key '{key}'{closest(key, TUNE_KEYS)}")
    base = data.get("base", {})
    if isinstance(base, str):
        base = load_yaml(path.parent / base if not Path(base).is_absolute() else base)
    base = apply_overrides(base, data.get("overrides") or {})
    space = dict(data.get("space") or {})
    if not space:
        raise ConfigError(f"tune file {path}: 'space' must declare at least one parameter")
    for key, spec in space.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in SUGGEST:
            raise ConfigError(f"tune file {path}: space.{key}.type must be one of {', '.join(SUGGEST)}")
        sample = spec["choices"][0] if kind == "categorical" else spec["low"]
        config_from_dict(apply_overrides(base, {key: sample}))  # the key and value type must be valid
    pruner = dict(data.get("pruner") or {"type": "median"})
    PRUNERS.get(pruner.get("type", "median"))
    return TuneSpec(str(data.get("name") or path.stem), base, space, int(data.get("n_trials", 10)),
                    str(data.get("metric", "zeroshot_auroc")), pruner)


def tune(spec: TuneSpec, opts: LaunchOptions, out: Path) -> dict[str, Any]:
    """Run (or join) the study until it has ``n_trials`` finished trials; write the best config YAML."""
    from core.train import StopTraining, train

    pruner_args = {k: v for k, v in spec.pruner.items() if k != "type"}
    pruner = PRUNERS.get(spec.pruner.get("type", "median"))(**pruner_args)
    study = optuna.create_study(study_name=f"tune/{spec.name}", storage=open_storage(opts), load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
    parent = _parent_run(spec, opts)

    def objective(trial: optuna.Trial) -> float:
        params = {key: SUGGEST[s["type"]](trial, key, s) for key, s in spec.space.items()}
        cfg = config_from_dict(apply_overrides(spec.base, params))
        cfg.name = f"{spec.name}-trial{trial.number}"
        if opts.tracking_uri:
            cfg.tracking.uri = opts.tracking_uri

        def report(epoch: int, metrics: dict[str, float]) -> None:
            value = metrics.get(spec.metric, math.nan)
            trial.report(value, epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned at epoch {epoch} ({spec.metric}={value:.4f})")

        try:
            result = train(cfg, resume=True, parent_run_id=parent, progress=opts.progress, epoch_callback=report,
                           tags={"tune": spec.name, "trial": str(trial.number)})
        except StopTraining as stop:
            raise optuna.TrialPruned(str(stop)) from None
        return float(result.metrics.get(spec.metric, math.nan))

    done = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, spec.n_trials - len(done))
    study.optimize(objective, n_trials=remaining, catch=(Exception,),
                   callbacks=[optuna.study.MaxTrialsCallback(spec.n_trials)])
    best = study.best_trial
    cfg = config_from_dict(apply_overrides(spec.base, best.params))
    path = save_config(cfg, out)
    Tracker(opts.tracking_uri, "", run_id=parent).finish()
    return {"best_value": best.value, "best_params": best.params, "best_trial": best.number, "config": str(path)}


def _parent_run(spec: TuneSpec, opts: LaunchOptions) -> str:
    runs = find_runs(opts.tracking_uri, f"tags.tune = '{spec.name}' and tags.`ctlab.kind` = 'tune'")
    if runs:
        return runs[0].info.run_id
    cfg = config_from_dict(spec.base)
    experiment = spec.name if cfg.tracking.experiment == "ctlab" else cfg.tracking.experiment
    return Tracker(opts.tracking_uri or cfg.tracking.uri, experiment, run_name=f"tune {spec.name}",
                   tags={"ctlab.kind": "tune", "tune": spec.name}).run_id
