"""Speed and calibration of the report's two-level bootstrap (``analysis.effects``), written to
``reports/bench/report-statistics.md``.

Speed: a 16-cell × 3-seed matrix, 100 validation volumes × 18 pathologies, 1000 resamples.
Calibration: the simulated matrices of ``tests/test_effects.py`` (2 configurations × 3 seeds, seed-level,
shared volume-level and run-level noise), with more simulations than the tests use.

Run: ``PYTHONPATH=. python reports/bench/report_statistics.py [--sims 1000]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from scipy import stats

from analysis.effects import Replicates, run_resamples, run_resamples_many
from tests import test_effects as sim


def speed() -> list[str]:
    rng = np.random.default_rng(0)
    labels = (rng.random((100, 18)) < 0.3).astype(float)
    scores = [rng.normal(size=labels.shape) + labels for _ in range(48)]
    configs = [f"c{i // 3}" for i in range(48)]
    start = time.perf_counter()
    full, resampled = run_resamples(labels, scores, "auroc", n=1000)
    rescore = time.perf_counter() - start
    start = time.perf_counter()
    replicates = Replicates(configs, full, resampled)
    for i in range(1, 16):
        replicates.contrast({f"c{i}": 1.0, "c0": -1.0})
    contrasts = time.perf_counter() - start
    start = time.perf_counter()
    run_resamples_many(labels, scores, ["auroc", "f1", "precision", "recall", "auprc"], n=1000)
    five = time.perf_counter() - start
    return [f"| re-score 48 runs on 1000 paired volume resamples (AUROC) | {rescore:.2f} s |",
            f"| seed resampling + 15 contrasts (CI, p, MDE) | {contrasts:.3f} s |",
            f"| re-score 48 runs, all five table metrics | {five:.2f} s |"]


def calibration(n: int) -> list[str]:
    sim.N_SIM = n
    null = sim.simulated_comparisons([1.0, 1.0], seed=1)
    volume_only = sim.simulated_comparisons([1.0, 1.0], seed=1, seed_level=False)
    mde = float(np.mean([e.mde for e in null]))
    separation = sim.SCALE * stats.norm.ppf(sim.true_auroc(1.0) + mde)
    planted = sim.true_auroc(separation) - sim.true_auroc(1.0)
    alternative = sim.simulated_comparisons([1.0, separation], seed=2)

    def row(what: str, rate: float, target: float) -> str:
        low, high = sim.binomial_interval(target, n)
        return f"| {what} | {rate:.3f} | {target:.2f} | [{low:.3f}, {high:.3f}] | {n} |"

    return [
        row("false-positive rate (A/A, α 0.05)", np.mean([e.p_value < 0.05 for e in null]), 0.05),
        row("CI coverage of Δ = 0", np.mean([e.ci_low <= 0 <= e.ci_high for e in null]), 0.95),
        row(f"power at the stated MDE (Δ AUROC {planted:.3f})",
            np.mean([e.p_value < 0.05 and e.delta > 0 for e in alternative]), 0.80),
        row("CI coverage of the planted Δ", np.mean([e.ci_low <= planted <= e.ci_high for e in alternative]), 0.95),
        row("false-positive rate, volume-only bootstrap (seed level dropped)",
            np.mean([e.p_value < 0.05 for e in volume_only]), 0.05),
        f"| median Welch–Satterthwaite df (A/A) | {np.median([e.df for e in null]):.1f} | | | {n} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=1000)
    args = parser.parse_args()
    lines = ["# Report statistics: speed and calibration", "",
             f"Machine: {platform.processor() or platform.machine()}, shared CPU; "
             f"`PYTHONPATH=. python reports/bench/report_statistics.py --sims {args.sims}`.", "",
             "## Speed (16 cells × 3 seeds, 100 volumes × 18 pathologies, 1000 resamples)", "",
             "| step | time |", "|:---|---:|", *speed(), "",
             "## Calibration (2 configurations × 3 seeds, 60 volumes × 3 labels, 200 resamples each)", "",
             "| check | measured | target | binomial 99 % interval | simulations |", "|:---|---:|---:|---:|---:|",
             *calibration(args.sims), ""]
    path = Path(__file__).with_name("report-statistics.md")
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
