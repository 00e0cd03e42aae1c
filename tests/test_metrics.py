import logging

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from core.metrics import (
    METRICS as METRICS_ALL,
)
from core.metrics import (
    THRESHOLDS,
    bootstrap_ci,
    bootstrap_indices,
    choose_threshold,
    classification_metrics,
    delong_test,
    paired_bootstrap,
    percentile_intervals,
    ranking_metrics,
    resample_counts,
    retrieval_recall,
    threshold_metrics,
)
from core.registry import ConfigError


def _data(n=200, k=5, seed=0, signal=1.0, decimals=None):
    """Multi-label targets with scores that separate them by ``signal`` (rounded to create ties)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < np.linspace(0.15, 0.5, k)).astype(float)
    scores = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(0, 1, (n, k)))))
    return labels, (np.round(scores, decimals) if decimals is not None else scores)


def _sk_macro_auroc(labels, scores):
    return np.mean([roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])])


# --------------------------------------------------------------------------- point estimates vs scikit-learn


@pytest.mark.parametrize("protocol", ["ctclip", "fixed0.5", "youden"])
def test_classification_metrics_equal_sklearn(protocol):
    labels, scores = _data(n=120, k=4, decimals=2)
    per_label, macro = classification_metrics(labels, scores, protocol, names=["a", "b", "c", "d"])
    assert list(per_label.columns) == ["pathology", "auroc", "auprc", "f1", "precision", "recall", "accuracy",
                                       "threshold", "protocol"]
    assert per_label["pathology"].tolist() == ["a", "b", "c", "d"]
    assert (per_label["protocol"] == protocol).all()
    for k, row in per_label.iterrows():
        y, s = labels[:, k], scores[:, k]
        assert row["threshold"] == choose_threshold(protocol, y, s)
        pred = (s > row["threshold"]).astype(int)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, s))
        assert row["auprc"] == pytest.approx(average_precision_score(y, s))
        assert row["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert row["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert row["recall"] == pytest.approx(recall_score(y, pred))
        assert row["accuracy"] == pytest.approx(accuracy_score(y, pred))
    for metric in ("auroc", "auprc", "f1", "precision", "recall", "accuracy"):
        assert macro[metric] == pytest.approx(per_label[metric].mean())


def test_ctclip_threshold_hand_computed():
    # thresholds t = i/99; rule score > t. Distances √((1−TPR)² + FPR²) per score interval:
    #   t < .2: (1, 1) → 1;  .2 ≤ t < .3: (1, 2/3) → .667;  .3 ≤ t < .5: (1, 1/3) → .333 (best)
    #   .5 ≤ t < .7: (.5, 1/3) → .601;  .7 ≤ t < .8: (.5, 0) → .5;  t ≥ .8: (0, 0) → 1
    # i = 30 … 49 reach .333; CT-CLIP keeps the last one (<=): 49/99.
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.2, 0.3, 0.7, 0.5, 0.8])
    assert choose_threshold("ctclip", labels, scores) == pytest.approx(49 / 99)
    per_label, _ = classification_metrics(labels, scores, "ctclip")
    row = per_label.iloc[0]
    # predictions [0, 0, 1, 1, 1]: F1⁺ = 4/5, F1⁻ = 4/5 → weighted 0.8; precision 2/3; recall 1; accuracy 4/5
    assert (row["f1"], row["precision"], row["recall"], row["accuracy"]) == pytest.approx((0.8, 2 / 3, 1.0, 0.8))


def test_ctclip_threshold_keeps_the_last_of_tied_distances():
    # .1 ≤ t < .4 gives (TPR 1, FPR .5) and .6 ≤ t < .9 gives (TPR .5, FPR 0): both at distance .5.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.9])
    assert choose_threshold("ctclip", labels, scores) == pytest.approx(89 / 99)


def test_youden_and_fixed_thresholds():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.2, 0.3, 0.7, 0.5, 0.8])
    # J per cut (everything positive … nothing): 0, 1/3, 2/3, 1/6, 1/2, 0 → cut between .3 and .5
    assert choose_threshold("youden", labels, scores) == pytest.approx(0.4)
    assert choose_threshold("fixed0.5", labels, scores) == 0.5
    # strict rule: a positive scored exactly 0.5 is predicted negative at fixed0.5
    per_label, _ = classification_metrics(np.array([1, 0, 1]), np.array([0.5, 0.2, 0.9]), "fixed0.5")
    assert per_label.loc[0, "recall"] == pytest.approx(0.5)


def test_threshold_protocols_registry():
    assert THRESHOLDS.names() == ["ctclip", "fixed0.5", "youden"]
    with pytest.raises(ConfigError, match="did you mean 'fixed0.5'"):
        classification_metrics(np.array([0, 1]), np.array([0.2, 0.8]), "fixed05")


def test_single_class_label_is_nan_and_left_out(caplog):
    labels, scores = _data(n=50, k=3)
    labels[:, 1] = 0
    with caplog.at_level(logging.WARNING, logger="core.metrics"):
        per_label, macro = classification_metrics(labels, scores, "ctclip", names=["x", "never", "z"])
    assert per_label.loc[1, ["auroc", "auprc", "f1", "threshold"]].isna().all()
    assert macro["auroc"] == pytest.approx(np.mean([roc_auc_score(labels[:, k], scores[:, k]) for k in (0, 2)]))
    assert "never" in caplog.text


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="must both be"):
        classification_metrics(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="0 or 1"):
        classification_metrics(np.array([[0.0], [2.0]]), np.array([[0.1], [0.2]]))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.array([[0.0], [1.0]]), np.array([[0.1], [np.nan]]))
    with pytest.raises(ValueError, match="label names"):
        classification_metrics(np.array([[0.0], [1.0]]), np.array([[0.1], [0.2]]), names=["a", "b"])


# --------------------------------------------------------------------------- vectorised metrics per resample


def test_vectorised_ranking_metrics_equal_sklearn_per_resample():
    labels, scores = _data(n=80, k=4, decimals=1)  # coarse rounding → many ties
    indices = bootstrap_indices(80, 25, seed=3)
    out = ranking_metrics(labels, scores, resample_counts(indices, 80))
    assert out["auroc"].shape == out["auprc"].shape == (25, 4)
    for b, idx in enumerate(indices):
        for k in range(4):
            y, s = labels[idx, k], scores[idx, k]
            assert out["auroc"][b, k] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert out["auprc"][b, k] == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_vectorised_threshold_metrics_equal_sklearn_per_resample():
    labels, scores = _data(n=60, k=3)
    pred = scores > 0.5
    indices = bootstrap_indices(60, 20, seed=1)
    out = threshold_metrics(labels, pred, resample_counts(indices, 60))
    for b, idx in enumerate(indices):
        for k in range(3):
            y, p = labels[idx, k], pred[idx, k]
            assert out["f1"][b, k] == pytest.approx(f1_score(y, p, average="weighted"))
            assert out["precision"][b, k] == pytest.approx(precision_score(y, p, zero_division=0))
            assert out["recall"][b, k] == pytest.approx(recall_score(y, p, zero_division=0))
            assert out["accuracy"][b, k] == pytest.approx(accuracy_score(y, p))


def test_resample_counts_are_the_multiplicities_of_the_drawn_indices():
    indices = bootstrap_indices(7, 5, seed=0)
    counts = resample_counts(indices, 7)
    for idx, row in zip(indices, counts, strict=True):
        np.testing.assert_array_equal(row, np.bincount(idx, minlength=7))


# --------------------------------------------------------------------------- bootstrap CIs


def test_bootstrap_really_resamples():
    """The CI equals percentiles of scikit-learn's macro AUROC on explicitly resampled arrays."""
    labels, scores = _data(n=100, k=3)
    indices = bootstrap_indices(100, 200, seed=5)
    explicit = [_sk_macro_auroc(labels[idx], scores[idx]) for idx in indices]
    low, high = bootstrap_ci(labels, scores, "ctclip", n=200, ci=0.9, seed=5)["auroc"]
    assert (low, high) == pytest.approx(tuple(np.percentile(explicit, [5, 95])))


@pytest.mark.parametrize("protocol", ["ctclip", "fixed0.5"])
def test_bootstrap_ci_contains_estimate_and_narrows_with_more_volumes(protocol):
    widths = {}
    for n in (100, 1600):
        labels, scores = _data(n=n, k=4, seed=n)
        _, macro = classification_metrics(labels, scores, protocol)
        cis = bootstrap_ci(labels, scores, protocol, n=1000, seed=0)
        assert set(cis) == set(macro)
        for metric, (low, high) in cis.items():
            assert low < macro[metric] < high, metric
        widths[n] = {m: high - low for m, (low, high) in cis.items()}
    for metric in widths[100]:
        assert 0 < widths[1600][metric] < widths[100][metric] / 2, metric  # ≈ 1/√16 = 1/4 in theory


def test_bootstrap_is_deterministic_for_a_seed():
    labels, scores = _data(n=120, k=3)
    assert bootstrap_ci(labels, scores, seed=7, n=300) == bootstrap_ci(labels, scores, seed=7, n=300)
    assert bootstrap_ci(labels, scores, seed=7, n=300) != bootstrap_ci(labels, scores, seed=8, n=300)


def test_bootstrap_rejects_bad_arguments():
    labels, scores = _data(n=20, k=2)
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_ci(labels, scores, n=0)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(labels, scores, metrics=["aucroc"])


# --------------------------------------------------------------------------- paired tests


def test_paired_bootstrap_identical_scores():
    labels, scores = _data(n=150, k=4)
    out = paired_bootstrap(labels, scores, scores.copy(), "auroc", n=500)
    assert out == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


@pytest.mark.parametrize("metric", ["auroc", "auprc", "f1"])
def test_paired_bootstrap_detects_a_clearly_better_scorer(metric):
    labels, good = _data(n=300, k=4, seed=1, signal=2.0)
    _, weak = _data(n=300, k=4, seed=1, signal=0.2)
    out = paired_bootstrap(labels, good, weak, metric, n=1000)
    _, macro_good = classification_metrics(labels, good)
    _, macro_weak = classification_metrics(labels, weak)
    assert out["delta"] == pytest.approx(macro_good[metric] - macro_weak[metric])
    assert out["delta"] > 0 and out["ci_low"] > 0 and out["p_value"] < 0.05
    reverse = paired_bootstrap(labels, weak, good, metric, n=1000)
    assert reverse["delta"] == pytest.approx(-out["delta"]) and reverse["p_value"] < 0.05


def test_delong_matches_its_definition():
    labels, a = _data(n=40, k=1, seed=2, signal=1.0, decimals=1)
    _, b = _data(n=40, k=1, seed=3, signal=0.5)
    y, a, b = labels[:, 0].astype(bool), a[:, 0], b[:, 0]
    out = delong_test(y, a, b)
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a)) and out["auc_b"] == pytest.approx(roc_auc_score(y, b))

    def components(s):  # ψ(x, y) = 1 if x > y, ½ if equal, 0 otherwise
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        return psi.mean(1), psi.mean(0)

    (a10, a01), (b10, b01) = components(a), components(b)
    m, n = y.sum(), (~y).sum()
    var = (np.var(a10, ddof=1) + np.var(b10, ddof=1) - 2 * np.cov(a10, b10)[0, 1]) / m + \
        (np.var(a01, ddof=1) + np.var(b01, ddof=1) - 2 * np.cov(a01, b01)[0, 1]) / n
    assert out["z"] == pytest.approx((a10.mean() - b10.mean()) / np.sqrt(var))
    assert delong_test(y, a, a)["p_value"] == 1.0


def test_delong_detects_a_clearly_better_scorer():
    labels, good = _data(n=300, k=1, seed=4, signal=2.0)
    _, weak = _data(n=300, k=1, seed=4, signal=0.1)
    assert delong_test(labels, good, weak)["p_value"] < 0.05


# --------------------------------------------------------------------------- retrieval


def test_retrieval_recall_equals_brute_force():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(30, 8))
    text = image + rng.normal(scale=1.5, size=(30, 8))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    out = retrieval_recall(image, text, ks=(1, 5, 10))
    for k in (1, 5, 10):
        v2t = np.mean([i in np.argsort(-(image[i] @ text.T))[:k] for i in range(30)])
        t2v = np.mean([i in np.argsort(-(text[i] @ image.T))[:k] for i in range(30)])
        assert out[f"retrieval_v2t_r{k}"] == pytest.approx(v2t)
        assert out[f"retrieval_t2v_r{k}"] == pytest.approx(t2v)
    assert 0 < out["retrieval_v2t_r1"] < out["retrieval_v2t_r10"] < 1


def test_retrieval_k_above_n_is_clipped_with_a_warning(caplog):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 4))
    with caplog.at_level(logging.WARNING, logger="core.metrics"):
        out = retrieval_recall(emb, rng.normal(size=(6, 4)), ks=(1, 50))
    assert out["retrieval_v2t_r50"] == out["retrieval_t2v_r50"] == 1.0
    assert "clipped" in caplog.text
    with pytest.raises(ValueError, match="must both be"):
        retrieval_recall(emb, emb[:3])


# --------------------------------------------------------------------------- against direct computations
# The references below resample explicitly (the same seeded draws as core.metrics: one row of
# ``default_rng(seed).integers(0, N, (n, N))`` per resample), score every resample with scikit-learn,
# and take numpy percentiles; they share no code with the vectorised implementation.


def _rare_tied(n=40, seed=11):
    """Three labels (common, 3 positives, 2 positives) with scores rounded to 0.1: rare labels and many ties."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 3))
    labels[:, 0] = rng.random(n) < 0.5
    labels[rng.choice(n, 3, replace=False), 1] = 1
    labels[rng.choice(n, 2, replace=False), 2] = 1
    scores_a = np.round(1 / (1 + np.exp(-(1.5 * (2 * labels - 1) + rng.normal(0, 1, labels.shape)))), 1)
    scores_b = np.round(1 / (1 + np.exp(-(0.3 * (2 * labels - 1) + rng.normal(0, 1, labels.shape)))), 1)
    return labels, scores_a, scores_b


def _ctclip_threshold_loop(y, s):
    """CT-CLIP's find_threshold written out: the last of 100 thresholds nearest the ROC's top-left corner."""
    best, best_t = np.inf, None
    for t in np.linspace(0, 1, 100):
        pred = s > t
        tpr = (pred & (y == 1)).sum() / (y == 1).sum()
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        distance = np.sqrt((1 - tpr) ** 2 + fpr**2)
        if distance <= best:
            best, best_t = distance, t
    return best_t


def _label_metric(metric, y, s, pred):
    """One label's ``metric`` by scikit-learn on (possibly resampled) arrays."""
    if metric == "auroc":
        return roc_auc_score(y, s)
    if metric == "auprc":
        return average_precision_score(y, s)
    if metric == "f1":
        return f1_score(y, pred, average="weighted", zero_division=0)
    if metric == "precision":
        return precision_score(y, pred, zero_division=0)
    if metric == "recall":
        return recall_score(y, pred, zero_division=0)
    return accuracy_score(y, pred)


def _explicit_macros(labels, scores, draws, metric):
    """Macro ``metric`` on each resample (a row of ``draws``): a label with one class in the resample (or in
    the data) counts as NaN and is left out of the mean. Thresholds are chosen once on all volumes."""
    thresholds = [_ctclip_threshold_loop(labels[:, k], scores[:, k]) if 0 < labels[:, k].sum() < len(labels)
                  else None for k in range(labels.shape[1])]
    out = []
    for idx in draws:
        values = []
        for k, threshold in enumerate(thresholds):
            y, s = labels[idx, k], scores[idx, k]
            if threshold is None or y.min() == y.max():
                values.append(np.nan)
            else:
                values.append(_label_metric(metric, y, s, (s > threshold).astype(int)))
        out.append(np.nan if np.isnan(values).all() else np.nanmean(values))
    return np.array(out)


def _draws(n_items, n_resamples, seed):
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


@pytest.mark.parametrize("metric", ["auroc", "auprc", "f1", "precision", "recall", "accuracy"])
def test_bootstrap_ci_equals_explicit_resampling_with_rare_labels_and_ties(metric):
    labels, scores, _ = _rare_tied()
    explicit = _explicit_macros(labels, scores, _draws(40, 150, seed=4), metric)
    low, high = bootstrap_ci(labels, scores, "ctclip", n=150, ci=0.95, seed=4, metrics=[metric])[metric]
    assert (low, high) == pytest.approx(tuple(np.nanpercentile(explicit, [2.5, 97.5])), abs=1e-12)


@pytest.mark.parametrize("rare", [1, 0])
def test_resample_that_draws_one_class_is_left_out_not_scored_zero(rare):
    """A label with 2 positives (or 2 negatives) in 30 volumes: ~13 % of resamples draw none of that class;
    they are NaN, not recall 0 (or AUPRC 1)."""
    labels = np.full((30, 1), 1.0 - rare)
    labels[[3, 17], 0] = rare
    scores = np.linspace(0.05, 0.7, 30)[:, None]
    scores[[3, 17], 0] = [0.9, 0.45]
    draws = _draws(30, 300, seed=0)
    no_positive = np.array([(labels[idx, 0] == rare).sum() == 0 for idx in draws])
    assert no_positive.sum() > 25  # the case really occurs, in more than 2.5 % of the resamples
    for metric in ("recall", "precision", "f1", "accuracy", "auroc", "auprc"):
        reference = _explicit_macros(labels, scores, draws, metric)
        assert np.isnan(reference[no_positive]).all() and not np.isnan(reference[~no_positive]).any()
        low, high = bootstrap_ci(labels, scores, "ctclip", n=300, seed=0, metrics=[metric])[metric]
        assert (low, high) == pytest.approx(tuple(np.nanpercentile(reference, [2.5, 97.5])), abs=1e-12), metric
        if metric == "recall" and rare:  # scoring those resamples 0 would drag the lower bound down to 0
            assert np.percentile(np.nan_to_num(reference, nan=0.0), 2.5) == 0.0 < low


@pytest.mark.parametrize("metric", ["auroc", "auprc", "f1", "recall"])
def test_paired_bootstrap_equals_explicit_paired_resampling(metric):
    labels, a, b = _rare_tied()
    n = 200
    draws = _draws(40, n, seed=2)
    deltas = _explicit_macros(labels, a, draws, metric) - _explicit_macros(labels, b, draws, metric)
    deltas = deltas[~np.isnan(deltas)]
    smaller_tail = min((deltas <= 0).sum(), (deltas >= 0).sum())
    p_value = min(1.0, 2 * (smaller_tail + 1) / (len(deltas) + 1))  # two-sided, +1 for the observed
    full = np.arange(40)[None, :]
    out = paired_bootstrap(labels, a, b, metric, n=n, seed=2, ci=0.9)
    assert out["delta"] == pytest.approx(_explicit_macros(labels, a, full, metric)[0] -
                                         _explicit_macros(labels, b, full, metric)[0], abs=1e-12)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.percentile(deltas, [5, 95])), abs=1e-12)
    assert out["p_value"] == pytest.approx(p_value, abs=1e-12)
    assert 0 < out["p_value"] < 1  # neither capped nor degenerate: the two-sided factor shows


def test_paired_bootstrap_p_value_agrees_with_the_normal_approximation():
    """For a moderate effect on many volumes the bootstrap distribution of Δ is close to normal, so its
    two-sided p-value is close to 2·Φ(−|mean Δ*| / sd Δ*) (scipy)."""
    labels, a = _data(n=300, k=1, seed=21, signal=1.0)
    b = a + np.random.default_rng(22).normal(0, 0.15, a.shape)  # the same scorer, degraded a little
    out = paired_bootstrap(labels, a, b, "auroc", n=600, seed=0)
    deltas = np.array([_sk_macro_auroc(labels[idx], a[idx]) - _sk_macro_auroc(labels[idx], b[idx])
                       for idx in _draws(300, 600, seed=0)])
    normal_p = 2 * stats.norm.sf(abs(deltas.mean()) / deltas.std(ddof=1))
    assert 0.01 < normal_p < 0.5
    assert out["p_value"] == pytest.approx(normal_p, abs=0.02)


def test_delong_p_value_is_the_two_sided_normal_tail_with_ties_and_a_rare_class():
    labels, a, b = _rare_tied(n=60, seed=5)
    y = labels[:, 1].astype(bool)  # 3 positives of 60; scores rounded to 0.1, so many ties
    out = delong_test(y, a[:, 1], b[:, 1])
    assert out["auc_a"] == pytest.approx(roc_auc_score(y, a[:, 1]))
    assert out["auc_b"] == pytest.approx(roc_auc_score(y, b[:, 1]))
    assert out["p_value"] == pytest.approx(2 * stats.norm.sf(abs(out["z"])))
    assert out["p_value"] == pytest.approx(stats.norm.sf(abs(out["z"])) + stats.norm.cdf(-abs(out["z"])))


# --------------------------------------------------------------------------- edges of the tests and retrieval


def test_delong_edges():
    y = np.array([1, 1, 0, 0, 0])
    a, b = np.array([0.9, 0.4, 0.5, 0.1, 0.2]), np.array([0.3, 0.8, 0.2, 0.6, 0.1])
    out = delong_test(y, a, b)  # exactly two positives is enough
    assert out["delta"] == pytest.approx(out["auc_a"] - out["auc_b"])
    assert delong_test(1 - y[:4], a[:4], b[:4])["auc_a"] == pytest.approx(roc_auc_score(1 - y[:4], a[:4]))
    same = delong_test(y, a, a)
    assert (same["z"], same["p_value"], same["delta"]) == (0.0, 1.0, 0.0)
    # zero variance but a real difference: a separates perfectly, b ties everything (AUC ½)
    perfect = delong_test(y, np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.full(5, 0.5))
    assert (perfect["delta"], perfect["z"], perfect["p_value"]) == (0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="DeLong's test needs at least two positive and two negative volumes"):
        delong_test(np.array([1, 0, 0, 0, 0]), a, b)
    with pytest.raises(ValueError, match="DeLong's test needs at least two positive"):
        delong_test(np.array([1, 1, 1, 1, 0]), a, b)
    with pytest.raises(ValueError, match=r"labels \(5,\), scores_a \(4,\) and scores_b \(5,\) must have the same"):
        delong_test(y, a[:4], b)


def test_retrieval_k_equal_to_n_is_not_clipped_and_bad_k_is_explained(caplog):
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(6, 4))
    with caplog.at_level(logging.WARNING, logger="core.metrics"):
        assert retrieval_recall(emb, emb, ks=(6,))["retrieval_v2t_r6"] == 1.0
    assert "clipped" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="core.metrics"):
        retrieval_recall(emb, emb, ks=(1, 7))
    assert "k=[7] larger than the 6 pairs; clipped to 6" in caplog.text
    with pytest.raises(ValueError, match="retrieval k must be >= 1, got 0"):
        retrieval_recall(emb, emb, ks=(0,))


def test_bootstrap_argument_edges_and_defaults():
    labels, scores = _data(n=30, k=2, seed=3)
    one = bootstrap_ci(labels, scores, n=1, metrics=["auroc"])["auroc"]  # a single resample is allowed
    assert one[0] == pytest.approx(one[1])
    for ci in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="0 < ci < 1"):
            bootstrap_ci(labels, scores, ci=ci)
    assert set(bootstrap_ci(labels, scores, n=5, metrics=["auroc", "recall"])) == {"auroc", "recall"}
    # documented defaults: 1000 resamples from seed 0, 95 %
    assert bootstrap_ci(labels, scores, metrics=["auroc"]) == bootstrap_ci(labels, scores, n=1000, seed=0, ci=0.95,
                                                                           metrics=["auroc"])


def test_paired_bootstrap_documented_defaults():
    labels, a, b = _rare_tied()
    assert paired_bootstrap(labels, a, b) == paired_bootstrap(labels, a, b, metric="auroc", n=1000, seed=0, ci=0.95,
                                                              protocol="ctclip")


def test_threshold_metrics_with_nothing_predicted_positive_score_precision_zero():
    labels, scores = _data(n=40, k=2, seed=6)
    pred = np.zeros_like(labels, dtype=bool)  # a threshold above every score
    indices = bootstrap_indices(40, 10, seed=0)
    out = threshold_metrics(labels, pred, resample_counts(indices, 40))
    for b, idx in enumerate(indices):
        for k in range(2):
            assert out["precision"][b, k] == precision_score(labels[idx, k], pred[idx, k], zero_division=0) == 0.0
            assert out["f1"][b, k] == pytest.approx(f1_score(labels[idx, k], pred[idx, k], average="weighted",
                                                             zero_division=0))


def test_paired_bootstrap_uses_its_protocol_for_the_point_estimate():
    labels, a, b = _rare_tied()
    out = paired_bootstrap(labels, a, b, "f1", n=50, protocol="fixed0.5")

    def f1_delta(protocol):
        f1 = [classification_metrics(labels, s, protocol)[1]["f1"] for s in (a, b)]
        return f1[0] - f1[1]

    delta = f1_delta("fixed0.5")
    assert delta != pytest.approx(f1_delta("ctclip"))
    assert out["delta"] == pytest.approx(delta)


def test_fixed_threshold_above_every_score_gives_precision_zero():
    labels = np.array([0, 1, 0, 1, 0, 0])
    scores = np.array([0.1, 0.4, 0.2, 0.3, 0.45, 0.05])  # nothing above 0.5: nothing predicted positive
    row = classification_metrics(labels, scores, "fixed0.5")[0].iloc[0]
    assert (row["precision"], row["recall"]) == (0.0, 0.0)
    assert row["f1"] == pytest.approx(f1_score(labels, np.zeros(6), average="weighted", zero_division=0))


def test_labels_with_one_positive_are_evaluated_and_all_positive_ones_are_not():
    labels = np.array([[1, 1], [0, 1], [0, 1], [0, 1]], dtype=float)
    scores = np.array([[0.9, 0.2], [0.1, 0.4], [0.3, 0.6], [0.2, 0.8]])
    per_label, macro = classification_metrics(labels, scores, "ctclip")
    assert per_label.loc[0, "auroc"] == 1.0 and per_label.loc[1, list(METRICS_ALL)].isna().all()
    assert macro["auroc"] == 1.0 and macro["f1"] == per_label.loc[0, "f1"]


def test_scores_on_a_threshold_are_predicted_negative():
    # score > t: at t = 0 the negative scored 0.0 is not predicted positive, so 0 ≤ t < 1 all reach the corner;
    # CT-CLIP keeps the last of them, 98/99 (with ≥, t = 1 would also reach it and win)
    assert choose_threshold("ctclip", np.array([0, 1]), np.array([0.0, 1.0])) == pytest.approx(98 / 99)
    labels, scores, _ = _rare_tied()
    scores[::3] = 0.5  # many scores exactly on the fixed threshold
    draws = _draws(40, 100, seed=1)
    for metric in ("recall", "precision"):
        reference = []
        for idx in draws:
            values = [_label_metric(metric, labels[idx, k], scores[idx, k], (scores[idx, k] > 0.5).astype(int))
                      if labels[idx, k].min() < labels[idx, k].max() else np.nan for k in range(3)]
            reference.append(np.nan if np.isnan(values).all() else np.nanmean(values))
        low, high = bootstrap_ci(labels, scores, "fixed0.5", n=100, seed=1, metrics=[metric])[metric]
        assert (low, high) == pytest.approx(tuple(np.nanpercentile(reference, [2.5, 97.5])), abs=1e-12)


def test_interval_of_all_nan_resamples_is_nan():
    out = percentile_intervals({"recall": np.full(5, np.nan), "auroc": np.array([0.5, 0.7, np.nan])}, 0.9)
    assert np.isnan(out["recall"][0]) and np.isnan(out["recall"][1]) and len(out["recall"]) == 2
    assert out["auroc"] == pytest.approx(tuple(np.nanpercentile([0.5, 0.7], [5, 95])))


def test_empty_input_is_explained_and_default_draws_are_seed_zero():
    with pytest.raises(ValueError, match="no volumes to evaluate: labels and scores are empty"):
        classification_metrics(np.zeros((0, 2)), np.zeros((0, 2)))
    one = classification_metrics(np.array([[1.0, 0.0]]), np.array([[0.3, 0.4]]))[0]  # one volume: NaN, no error
    assert one[["auroc", "f1"]].isna().all().all()
    np.testing.assert_array_equal(bootstrap_indices(5, 3), bootstrap_indices(5, 3, seed=0))
