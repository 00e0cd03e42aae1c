"""Effects with honest uncertainty: seeds are replicates, validation volumes are paired, p-values are adjusted.

The statistics behind the report's Δ columns, kept apart from table rendering.

Data: each training run r (a configuration c at one seed) scored the same
validation volumes. ``run_resamples`` computes the run's macro metric on the
full validation set and on B volume resamples, the *same* B multisets of
volumes for every run (``core.metrics.bootstrap_indices``), so configurations
are compared on identical volumes (paired).

Two-level bootstrap (``Replicates``): in resample b each configuration's
seeds are drawn with replacement (independently per configuration: training
runs are independent replicates), and each drawn run is evaluated on volume
multiset b. The configuration's value in resample b is the mean over the
drawn seeds. With n seeds the plain bootstrap of a mean has variance
(n − 1)/n · s²/n; the seed deviations are scaled by √(n/(n − 1)) before
drawing so the seed level contributes s²/n, its unbiased value. Seeds and
volumes are crossed, not nested: a run's own volume-by-volume noise (the seed ×
volume interaction, I) is already in the seeds' spread on the full set
(s² ≈ σ²_seed + I); the resampled volume sets count it twice more (in the
seeds' spread on a resample, ≈ σ²_seed + 2I, and in the spread of the seed
mean, I/n). Its estimate, the volume-bootstrap variance of each run's deviation
from its configuration's seed mean, is subtracted twice so it counts once.

A comparison is a contrast Δ = Σ_c w_c · m̄_c of the configurations' seed means
(configuration − baseline; a main effect: the mean over matched cells;
an interaction: the mean difference of differences). Its standard error is
the standard deviation of the contrast over the two-level resamples, less the
double-counted interaction (never below the seed part alone). With few
seeds the standard error itself is uncertain, so the 95 % CI and the
two-sided p-value use Student's t with Welch–Satterthwaite degrees of freedom
(each configuration's seed variance s²_c/n_c has n_c − 1 degrees of freedom;
the volume part is treated as known): CI = Δ ± t·se, p = 2·(1 − F_t(|Δ|/se)).
A configuration with one seed cannot show its seed variance; in a matrix where
other configurations have several seeds it borrows their pooled seed variance
(Σ (n_c − 1) s²_c / Σ (n_c − 1), with that many degrees of freedom; the seed
level is assumed alike across configurations); when every configuration has
one seed there is none to borrow, the CI covers volume sampling only and the
reference is the normal. ``n_seeds`` (the fewest seeds in a contrast) says so. The minimal detectable effect is se times
the |Δ|/se that this t-test detects with power 1 − β at level α, solved on the
noncentral t (``detectable_ratio``). Holm's step-down
adjustment (statsmodels' ``multipletests``) is applied within each family of
comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

from core.metrics import bootstrap_indices, resample_counts, resampled_metrics

ALPHA = 0.05
POWER = 0.80


def run_resamples(labels: np.ndarray, scores: Sequence[np.ndarray], metric: str, protocol: str = "ctclip",
                  n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each run's macro ``metric`` on all volumes, (R,), and on the ``n`` shared volume resamples, (R, n).

    ``labels`` (N, K) are the validation labels every run was scored on; ``scores`` holds one (N, K) array per
    run, rows in the same volume order. Labels with one class are left out of every macro mean.
    """
    return run_resamples_many(labels, scores, [metric], protocol, n, seed)[metric]


def run_resamples_many(labels: np.ndarray, scores: Sequence[np.ndarray], metrics: Sequence[str],
                       protocol: str = "ctclip", n: int = 1000,
                       seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``run_resamples`` of several metrics at once (one pass over each run's scores): metric → (full, resampled)."""
    labels = np.asarray(labels, dtype=float)
    weights = resample_counts(bootstrap_indices(labels.shape[0], n, seed), labels.shape[0])
    weights = np.vstack([np.ones((1, labels.shape[0])), weights])  # row 0: the full validation set
    per_run = [resampled_metrics(labels, np.asarray(s, dtype=float), protocol, weights, list(metrics))
               for s in scores]
    out = {}
    for metric in metrics:
        values = np.stack([run[metric] for run in per_run])
        out[metric] = (values[:, 0], values[:, 1:])
    return out


@dataclass
class Effect:
    """One contrast: Δ, its two-level standard error, 95 % CI, two-sided p, degrees of freedom and the
    minimal detectable effect (MDE, |Δ| detected with 80 % power at α 0.05); ``n_seeds`` is the fewest seeds
    of any configuration in it."""

    delta: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    p_value: float
    mde: float
    n_seeds: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a flat mapping (one table row)."""
        return {"delta": self.delta, "se": self.se, "df": self.df, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "p_value": self.p_value, "mde": self.mde, "n_seeds": self.n_seeds}


class Replicates:
    """The two-level bootstrap of a set of runs, ready to evaluate any contrast of their configurations.

    ``configs`` names each run's configuration; ``full`` (R,) and ``resampled`` (R, B) are
    ``run_resamples``' output for those runs (the same volume resamples for all of them). A resample in which
    some run has no value (every label drawn with one class) is dropped for all runs, keeping them paired.
    ``seed`` seeds the seed-level draws; ``seed_level=False`` keeps every run's seeds fixed (a volume-only
    bootstrap, which ignores training-seed variance: the miscalibrated reference the tests compare with).
    """

    def __init__(self, configs: Sequence[str], full: np.ndarray, resampled: np.ndarray, seed: int = 0,
                 seed_level: bool = True) -> None:
        configs = list(configs)
        full, resampled = np.asarray(full, dtype=float), np.asarray(resampled, dtype=float)
        if len(configs) != len(full) or resampled.shape[0] != len(full):
            raise ValueError(f"{len(configs)} configuration names for {len(full)} runs / {resampled.shape[0]} rows "
                             "of resamples; give one of each per run")
        resampled = resampled[:, ~np.isnan(resampled).any(axis=0)]  # a resample where some run has no value
        self.n_resamples = resampled.shape[1]
        self.mean: dict[str, float] = {}
        self.n_seeds: dict[str, int] = {}
        self.seed_variance: dict[str, float] = {}  # s²_c / n_c, the variance of the seed mean (0 with one seed)
        self.volume_only: dict[str, np.ndarray] = {}  # seed mean per volume resample, seeds held fixed
        self.two_level: dict[str, np.ndarray] = {}  # seed mean per resample, seeds and volumes resampled
        self.overlap: dict[str, float] = {}  # seed × volume variance counted by both levels (see ``contrast``)
        rng = np.random.default_rng(seed)
        for name in dict.fromkeys(configs):
            rows = [i for i, c in enumerate(configs) if c == name]
            values, boot = full[rows], resampled[rows]  # (n,), (n, B)
            n = len(rows)
            self.mean[name] = float(values.mean())
            self.n_seeds[name] = n
            centre = boot.mean(0)
            self.volume_only[name] = centre
            if n == 1 or not seed_level:
                self.seed_variance[name] = 0.0
                self.overlap[name] = 0.0
                self.two_level[name] = centre
                continue
            self.seed_variance[name] = float(values.var(ddof=1) / n)
            inflated = centre + np.sqrt(n / (n - 1)) * (boot - centre)  # (n, B)
            self.overlap[name] = float((boot - centre).var(axis=1, ddof=1).sum() / (n - 1) / n)
            counts = resample_counts(rng.integers(0, n, size=(self.n_resamples, n)), n)  # (B, n)
            self.two_level[name] = (counts * inflated.T).sum(1) / n
        self.borrowed: dict[str, float] = {}  # one-seed configurations: the pooled seed variance they borrow
        self.pooled_df = sum(n - 1 for n in self.n_seeds.values())
        single = [c for c, n in self.n_seeds.items() if n == 1]
        if seed_level and single and self.pooled_df:
            weight = {c: (n - 1) / self.pooled_df for c, n in self.n_seeds.items() if n > 1}
            pooled = sum(w * self.seed_variance[c] * self.n_seeds[c] for c, w in weight.items())
            interaction = sum(w * self.overlap[c] * self.n_seeds[c] for c, w in weight.items())
            for name in single:
                self.borrowed[name] = pooled
                self.overlap[name] = interaction / 2  # its volume bootstrap already holds I once: subtract once

    @property
    def configs(self) -> list[str]:
        """The configurations, in first-seen order."""
        return list(self.mean)

    def contrast(self, weights: Mapping[str, float], alpha: float = ALPHA, power: float = POWER) -> Effect:
        """Δ = Σ weights[c] · mean_c with its two-level CI, p-value and minimal detectable effect."""
        unknown = [c for c in weights if c not in self.mean]
        if unknown:
            raise KeyError(f"no runs of configuration(s) {unknown} in these replicates")
        delta = float(sum(w * self.mean[c] for c, w in weights.items()))
        boot = sum(w * self.two_level[c] for c, w in weights.items())
        borrowed = sum(w**2 * self.borrowed.get(c, 0.0) for c, w in weights.items())
        seed_part = sum(w**2 * self.seed_variance[c] for c, w in weights.items()) + borrowed
        overlap = sum(w**2 * self.overlap[c] for c, w in weights.items())
        se = float(np.sqrt(max(np.var(boot, ddof=1) - 2 * overlap + borrowed, seed_part)))
        parts = [(w**2 * self.seed_variance[c], self.n_seeds[c] - 1) for c, w in weights.items()
                 if self.seed_variance[c] > 0]
        if borrowed > 0:
            parts.append((borrowed, self.pooled_df))
        df = se**4 / sum(v**2 / d for v, d in parts) if parts and se > 0 else np.inf
        if borrowed > 0:  # the pooled variance shares its seeds with the other parts: no more df than it has
            df = min(df, self.pooled_df)
        df = max(df, 1.0)
        n_seeds = min(self.n_seeds[c] for c in weights)
        if se == 0:
            p = 1.0 if delta == 0 else 0.0
            return Effect(delta, 0.0, df, delta, delta, p, 0.0, n_seeds)
        t_crit = stats.t.ppf(1 - alpha / 2, df)
        p = float(2 * stats.t.sf(abs(delta) / se, df))
        mde = float(detectable_ratio(df, alpha, power) * se)
        return Effect(delta, se, float(df), delta - t_crit * se, delta + t_crit * se, min(p, 1.0), mde, n_seeds)

    def level(self, config: str, alpha: float = ALPHA) -> Effect:
        """One configuration's mean metric over its seeds with its two-level CI (a contrast of weight 1)."""
        return self.contrast({config: 1.0}, alpha)


def detectable_ratio(df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The |Δ| / se that a two-sided t-test at level ``alpha`` with ``df`` degrees of freedom detects with
    probability ``power`` (solved on the noncentral t; the normal quantiles z_{1−α/2} + z_power when df is ∞)."""
    if not np.isfinite(df):
        return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    t_crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(ratio: float) -> float:
        wrong_side = np.nan_to_num(stats.nct.cdf(-t_crit, df, ratio))  # rejects with the wrong sign; ≈ 0
        return stats.nct.sf(t_crit, df, ratio) + wrong_side - power

    high = t_crit + stats.t.ppf(power, df) + 1.0  # the usual approximation, widened until it brackets
    while shortfall(high) < 0 and high < 1e4:
        high *= 2
    if not np.isfinite(shortfall(high)):
        return float(t_crit + stats.t.ppf(power, df))
    return float(optimize.brentq(shortfall, 0.0, high))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels' ``multipletests(method="holm")``); NaN entries stay NaN."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return out


def effects_frame(replicates: Replicates, contrasts: Sequence[Mapping[str, object]]) -> pd.DataFrame:
    """One row per contrast (``weights`` plus descriptive keys), with the ``Effect`` fields and ``p_adj``
    (Holm across these rows: one family)."""
    rows = []
    for contrast in contrasts:
        effect = replicates.contrast(contrast["weights"])  # type: ignore[arg-type]
        rows.append({**{k: v for k, v in contrast.items() if k != "weights"}, **effect.as_dict()})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["p_adj"] = holm(frame["p_value"])
    return frame
