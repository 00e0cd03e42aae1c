"""The matrix's cell sampler proposes every cell and survives retried (enqueued) cells."""

import optuna

from experiments.launcher import CellSampler


def _study(tmp_path, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", sampler=sampler, direction="maximize")


def _cell(trial: optuna.Trial) -> float:
    return float(len(trial.suggest_categorical("cell", ["a", "b", "c"])))


def test_sampler_proposes_each_cell_once(tmp_path):
    study = _study(tmp_path, CellSampler({"cell": ["a", "b", "c"]}, seed=0))
    for _ in range(3):
        study.optimize(_cell, n_trials=1)
    assert sorted(t.params["cell"] for t in study.trials) == ["a", "b", "c"]


def test_a_retried_cell_with_one_cell_left_finishes(tmp_path):
    """A worker retrying a cell (an enqueued trial) while one other cell is unvisited must not crash.

    Optuna 5.0's GridSampler raises KeyError('grid_id') here, which killed a worker mid-matrix.
    """
    study = _study(tmp_path, CellSampler({"cell": ["a", "b", "c"]}, seed=0))
    study.optimize(_cell, n_trials=2)
    retried = study.trials[0].params["cell"]
    study.enqueue_trial({"cell": retried}, skip_if_exists=False)
    study.optimize(_cell, n_trials=1)
    study.optimize(_cell, n_trials=1)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.params["cell"] for t in study.trials) == sorted(["a", "b", "c", retried])
