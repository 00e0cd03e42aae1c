"""The two-level bootstrap (``analysis.effects``): calibration on simulated matrices with known truth, known
effects recovered, and the vectorised statistics against a direct computation with explicit loops.

Simulation: each configuration has a true separation of its scores between positive and negative volumes;
each training seed shifts it (seed-level noise), every volume carries noise shared by all runs (the paired
validation set) and each run adds its own volume-by-volume noise. The population AUROC of a configuration
averaged over seeds is then Φ(separation / √(2σ²_volume + 2σ²_run + σ²_seed)), the true value every
CI should cover.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from analysis.effects import Replicates, detectable_ratio, effects_frame, holm, run_resamples
from core.metrics import bootstrap_indices

SD_SEED, SD_VOLUME, SD_RUN = 0.2, 0.7, 0.5
SCALE = np.sqrt(2 * SD_VOLUME**2 + 2 * SD_RUN**2 + SD_SEED**2)
N_SIM, SEEDS, VOLUMES, LABELS, RESAMPLES = 200, 3, 60, 3, 200


def binomial_interval(rate: float, n: int = N_SIM, level: float = 0.99) -> tuple[float, float]:
    """The central ``level`` interval of a binomial rejection / coverage rate."""
    low, high = stats.binom.interval(level, n, rate)
    return low / n, high / n


def true_auroc(separation: float) -> float:
    return float(stats.norm.cdf(separation / SCALE))


def simulate(rng: np.random.Generator, separations: list[float], seeds: int = SEEDS) -> tuple:
    """(labels, run configurations, run scores) of one simulated matrix."""
    labels = (rng.random((VOLUMES, LABELS)) < 0.4).astype(float)
    labels[0], labels[1] = 0, 1
    shared = rng.normal(0, SD_VOLUME, labels.shape)
    configs, scores = [], []
    for c, separation in enumerate(separations):
        for _ in range(seeds):
            shift = separation + rng.normal(0, SD_SEED)
            scores.append(shift * labels + shared + rng.normal(0, SD_RUN, labels.shape))
            configs.append(f"c{c}")
    return labels, configs, scores


def simulated_comparisons(separations: list[float], seed: int, seed_level: bool = True) -> list:
    """``N_SIM`` simulated c1 − c0 comparisons (``Effect``s)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N_SIM):
        labels, configs, scores = simulate(rng, separations)
        full, resampled = run_resamples(labels, scores, "auroc", n=RESAMPLES, seed=i)
        out.append(Replicates(configs, full, resampled, seed=i, seed_level=seed_level).contrast({"c1": 1, "c0": -1}))
    return out


@pytest.fixture(scope="module")
def null_results() -> list:
    return simulated_comparisons([1.0, 1.0], seed=1)


def test_false_positive_rate_is_alpha_under_no_effect(null_results: list) -> None:
    rate = np.mean([e.p_value < 0.05 for e in null_results])
    low, high = binomial_interval(0.05)
    assert low <= rate <= high, f"A/A rejection rate {rate:.3f} outside [{low:.3f}, {high:.3f}] ({N_SIM} simulations)"


def test_ci_covers_the_true_delta(null_results: list) -> None:
    coverage = np.mean([e.ci_low <= 0 <= e.ci_high for e in null_results])
    low, high = binomial_interval(0.95)
    assert low <= coverage <= high, f"coverage {coverage:.3f} outside [{low:.3f}, {high:.3f}]"


def test_a_volume_only_bootstrap_is_miscalibrated() -> None:
    """Drop the seed level and the same A/A comparisons reject far more often than 5 %: seeds matter here."""
    rate = np.mean([e.p_value < 0.05 for e in simulated_comparisons([1.0, 1.0], seed=1, seed_level=False)])
    assert rate > binomial_interval(0.05)[1] + 0.05, rate


def test_planted_delta_is_detected_at_the_stated_power(null_results: list) -> None:
    """Plant the minimal detectable effect the null matrices state (80 % power) and detect it ≈ 80 % of the time
    (at least the binomial 99 % lower bound: with few seeds the stated MDE errs on the safe side); the CI covers
    the planted Δ about 95 % of the time."""
    mde = float(np.mean([e.mde for e in null_results]))
    separation = SCALE * stats.norm.ppf(true_auroc(1.0) + mde)
    planted = true_auroc(separation) - true_auroc(1.0)
    assert planted == pytest.approx(mde)
    results = simulated_comparisons([1.0, separation], seed=2)
    power = np.mean([e.p_value < 0.05 and e.delta > 0 for e in results])
    low, high = binomial_interval(0.80)
    assert low <= power <= high + 0.1, f"power {power:.3f} at the stated MDE {mde:.3f} ({N_SIM} simulations)"
    coverage = np.mean([e.ci_low <= planted <= e.ci_high for e in results])
    assert binomial_interval(0.95)[0] <= coverage, coverage


def test_known_effects_are_recovered() -> None:
    """A large planted effect over many seeds: Δ near the truth, a tiny p, and a main effect over a 2 × 2
    factorial equal to the mean of the matched differences."""
    rng = np.random.default_rng(5)
    separations = {"a0b0": 0.6, "a1b0": 1.4, "a0b1": 0.6, "a1b1": 1.4}
    labels, configs, scores = simulate(rng, list(separations.values()), seeds=6)
    names = list(separations)
    configs = [names[int(c[1:])] for c in configs]
    full, resampled = run_resamples(labels, scores, "auroc", n=300, seed=0)
    replicates = Replicates(configs, full, resampled, seed=0)
    weights = {"a1b0": 0.5, "a0b0": -0.5, "a1b1": 0.5, "a0b1": -0.5}
    effect = replicates.contrast(weights)
    truth = true_auroc(1.4) - true_auroc(0.6)
    assert effect.ci_low <= truth <= effect.ci_high and effect.p_value < 1e-3
    means = {c: full[[i for i, x in enumerate(configs) if x == c]].mean() for c in names}
    assert effect.delta == pytest.approx((means["a1b0"] - means["a0b0"] + means["a1b1"] - means["a0b1"]) / 2)
    null_b = replicates.contrast({"a0b1": 0.5, "a0b0": -0.5, "a1b1": 0.5, "a1b0": -0.5})
    assert null_b.ci_low <= 0 <= null_b.ci_high
    assert effect.n_seeds == 6


def _macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    values = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])
              if 0 < labels[:, k].sum() < len(labels)]
    return float(np.mean(values))


def test_matches_a_direct_computation_with_explicit_loops() -> None:
    """Tiny case: 2 configurations × (3, 2) seeds, 12 volumes, 2 labels, 50 resamples — every number recomputed
    with scikit-learn's AUROC on explicitly resampled arrays and plain loops over seeds."""
    rng = np.random.default_rng(3)
    labels, configs, scores = simulate(rng, [1.0, 1.3], seeds=3)
    labels, scores = labels[:12], [s[:12] for s in scores]
    keep = [0, 1, 2, 3, 4]  # c0: 3 seeds, c1: 2 seeds
    configs, scores = [configs[i] for i in keep], [scores[i] for i in keep]
    n_resamples = 50
    full, resampled = run_resamples(labels, scores, "auroc", n=n_resamples, seed=7)
    replicates = Replicates(configs, full, resampled, seed=11)
    effect = replicates.contrast({"c1": 1.0, "c0": -1.0})

    indices = bootstrap_indices(len(labels), n_resamples, 7)
    direct = np.array([[_macro_auroc(labels[idx], s[idx]) for idx in indices] for s in scores])
    direct_full = np.array([_macro_auroc(labels, s) for s in scores])
    np.testing.assert_allclose(full, direct_full, atol=1e-12)
    np.testing.assert_allclose(resampled, direct, atol=1e-12)

    seed_rng = np.random.default_rng(11)
    boot = {}
    seed_var, overlap, dof = {}, {}, {}
    for name in ("c0", "c1"):
        rows = [i for i, c in enumerate(configs) if c == name]
        n = len(rows)
        draws = seed_rng.integers(0, n, size=(n_resamples, n))
        series = []
        for b in range(n_resamples):
            centre = np.mean([direct[r, b] for r in rows])
            drawn = [centre + np.sqrt(n / (n - 1)) * (direct[rows[j], b] - centre) for j in draws[b]]
            series.append(np.mean(drawn))
        boot[name] = np.array(series)
        values = direct_full[rows]
        seed_var[name] = np.var(values, ddof=1) / n
        deviations = [direct[r] - direct[rows].mean(0) for r in rows]
        overlap[name] = sum(np.var(d, ddof=1) for d in deviations) / (n - 1) / n
        dof[name] = n - 1
    delta = direct_full[3:].mean() - direct_full[:3].mean()
    variance = np.var(boot["c1"] - boot["c0"], ddof=1) - 2 * (overlap["c0"] + overlap["c1"])
    se = np.sqrt(max(variance, seed_var["c0"] + seed_var["c1"]))
    df = se**4 / sum(seed_var[c] ** 2 / dof[c] for c in ("c0", "c1"))
    assert effect.delta == pytest.approx(delta, abs=1e-12)
    assert effect.se == pytest.approx(se, rel=1e-9)
    assert effect.df == pytest.approx(df, rel=1e-9)
    half = stats.t.ppf(0.975, df) * se
    assert (effect.ci_low, effect.ci_high) == pytest.approx((delta - half, delta + half), rel=1e-9)
    assert effect.p_value == pytest.approx(2 * (1 - stats.t.cdf(abs(delta) / se, df)), rel=1e-9)
    assert effect.n_seeds == 2


def test_minimal_detectable_effect_has_the_stated_power() -> None:
    """At |Δ| = ratio · se a two-sided t-test with df degrees of freedom rejects with probability 0.80 (checked by
    simulating t statistics), and with infinite df the ratio is z₀.₉₇₅ + z₀.₈₀ = 2.80."""
    assert detectable_ratio(np.inf) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    rng = np.random.default_rng(0)
    for df in (3.0, 12.0):
        ratio = detectable_ratio(df)
        t = (ratio + rng.normal(size=200_000)) / np.sqrt(rng.chisquare(df, 200_000) / df)
        assert np.mean(np.abs(t) > stats.t.ppf(0.975, df)) == pytest.approx(0.80, abs=0.005)


def test_holm_adjustment() -> None:
    p = [0.01, 0.04, 0.03, np.nan, 0.2]
    adjusted = holm(p)
    # Holm by hand: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, running maximum, capped at 1
    expected = {0: 0.04, 2: 0.09, 1: 0.09, 4: 0.2}
    for i, value in expected.items():
        assert adjusted[i] == pytest.approx(value)
    assert np.isnan(adjusted[3])
    np.testing.assert_allclose(np.delete(adjusted, 3), multipletests([0.01, 0.04, 0.03, 0.2], method="holm")[1])


def test_effects_frame_adjusts_one_family() -> None:
    rng = np.random.default_rng(4)
    labels, configs, scores = simulate(rng, [1.0, 1.0, 2.0], seeds=2)
    full, resampled = run_resamples(labels, scores, "auroc", n=100, seed=0)
    replicates = Replicates(configs, full, resampled)
    frame = effects_frame(replicates, [{"config": "c1", "weights": {"c1": 1, "c0": -1}},
                                       {"config": "c2", "weights": {"c2": 1, "c0": -1}}])
    assert list(frame["config"]) == ["c1", "c2"]
    np.testing.assert_allclose(frame["p_adj"], multipletests(frame["p_value"], method="holm")[1])
    assert (frame["p_adj"] >= frame["p_value"]).all()


def test_p_value_and_ci_agree() -> None:
    """The CI at level 1 − p has 0 on its edge: p is two-sided and belongs to the same interval."""
    rng = np.random.default_rng(8)
    labels, configs, scores = simulate(rng, [1.0, 1.25], seeds=3)
    full, resampled = run_resamples(labels, scores, "auroc", n=200, seed=0)
    replicates = Replicates(configs, full, resampled)
    effect = replicates.contrast({"c1": 1, "c0": -1})
    assert 0.001 < effect.p_value < 0.999
    edge = replicates.contrast({"c1": 1, "c0": -1}, alpha=effect.p_value)
    assert min(abs(edge.ci_low), abs(edge.ci_high)) == pytest.approx(0, abs=1e-9)
    inside = replicates.contrast({"c1": 1, "c0": -1}, alpha=effect.p_value * 0.9)
    assert inside.ci_low < 0 < inside.ci_high


def test_a_one_seed_configuration_borrows_the_pooled_seed_variance() -> None:
    """A/A comparisons of a one-seed configuration with a three-seed one (a third configuration also has three):
    the one-seed side borrows the pooled seed variance, and the test stays calibrated."""
    rng = np.random.default_rng(3)
    rejections = []
    for i in range(N_SIM):
        labels, configs, scores = simulate(rng, [1.0, 1.0, 1.0], seeds=3)
        keep = [0, 1, 2, 3, 6, 7, 8]  # c0: 3 seeds, c1: 1 seed, c2: 3 seeds
        full, resampled = run_resamples(labels, [scores[k] for k in keep], "auroc", n=RESAMPLES, seed=i)
        replicates = Replicates([configs[k] for k in keep], full, resampled, seed=i)
        effect = replicates.contrast({"c1": 1, "c0": -1})
        rejections.append(effect.p_value < 0.05)
    assert replicates.borrowed["c1"] > 0 and effect.n_seeds == 1 and effect.df <= 4
    low, high = binomial_interval(0.05)
    assert low <= np.mean(rejections) <= high, np.mean(rejections)
