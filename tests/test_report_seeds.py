"""``ctlab report`` on a real MLflow SQLite store holding matrices with 2 seeds per cell (end to end: slow).

The matrices (attention standard / sdpa × loss clip / siglip, ``repeats: 2``) are expanded by
``experiments.matrix.load_matrix``; each cell is logged as the launcher logs it (``Tracker``: the resolved
config as params, the cell's tags, a child of the matrix's parent run) with predictions of known signal and
the metrics ``core.metrics`` computes from them. In ``seeds_ok`` SDPA scores as standard attention does at
the same seed (the same math), the sigmoid loss helps, and every run also has a linear-probe readout; in
``seeds_broken`` SDPA is planted better (a failed negative control) and no run has a probe readout.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from core.cli import main
from core.data.pathologies import PATHOLOGIES
from core.metrics import classification_metrics
from core.tracking import Tracker
from experiments.matrix import load_matrix
from tests.run_fixtures import tiny_run

pytestmark = pytest.mark.slow

N_VOLUMES = 40
SA, SDPA = "SA+GEGLU+LN", "SDPA+GEGLU+LN"  # the tiny CT-ViT's MLP is GEGLU


def _frame(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"VolumeName": np.repeat([f"valid_{i}_a_1.nii.gz" for i in range(N_VOLUMES)],
                                                 len(PATHOLOGIES)),
                         "pathology": np.tile(PATHOLOGIES, N_VOLUMES), "score": scores.ravel(),
                         "label": labels.ravel().astype(int)})


def _scores(labels: np.ndarray, shared: np.ndarray, separation: float, seed: int, attention: str,
            loss: str) -> np.ndarray:
    """A run's scores: its seed's own noise (identical for SA and SDPA: the same math at the same seed, up to
    float rounding), the validation set's shared noise, and the configuration's separation."""
    rng = np.random.default_rng(1000 * seed + (loss == "siglip"))
    seed_shift = rng.normal(0, 0.15)
    own = rng.normal(0, 0.6, labels.shape)
    rounding = np.random.default_rng(hash((seed, attention, loss)) % 2**32).normal(0, 1e-4, labels.shape)
    return 1 / (1 + np.exp(-((separation + seed_shift) * (labels - 0.5) + shared + own + rounding)))


def _log_matrix(uri: str, root: Path, name: str, planted_sdpa: float, probe: bool) -> dict:
    matrix = load_matrix({"name": name, "base": tiny_run(root / "data", root / "out", 2),
                          "axes": {"model.attention": ["standard", "sdpa"], "model.loss": ["clip", "siglip"]},
                          "repeats": 2, "baseline": {"model.attention": "standard", "model.loss": "clip"}})
    parent = Tracker(uri, name, run_name=name, tags={"ctlab.kind": "matrix", "matrix": name})
    parent.log_text(f"name: {name}\nbaseline: {{model.attention: standard, model.loss: clip}}\n", "matrix.yaml")
    rng = np.random.default_rng(0)
    labels = (rng.random((N_VOLUMES, len(PATHOLOGIES))) < 0.35).astype(float)
    labels[0], labels[1] = 0, 1
    shared = rng.normal(0, 0.5, labels.shape)
    runs = {}
    for cell in matrix.cells:
        attention, loss, seed = cell.config.model.attention, cell.config.model.loss, cell.config.train.seed
        separation = 1.0 + 0.8 * (loss == "siglip") + planted_sdpa * (attention == "sdpa")
        tracker = Tracker(uri, cell.config.tracking.experiment, run_name=cell.label, parent_run_id=parent.run_id,
                          tags={"ctlab.kind": "train", "matrix": name, "cell_id": cell.cell_id,
                                "cell_label": cell.label})
        tracker.log_config(cell.config)
        folder = root / name / cell.cell_id
        folder.mkdir(parents=True)
        readouts = {"zeroshot": _scores(labels, shared, separation, seed, attention, loss)}
        if probe:
            readouts["probe"] = _scores(labels, shared, separation + 1.5, seed + 50, attention, loss)
        metrics = {}
        for readout, scores in readouts.items():
            _frame(labels, scores).to_csv(folder / f"{readout}_predictions.csv", index=False)
            macro = classification_metrics(labels, scores, "ctclip", PATHOLOGIES)[1]
            metrics.update({f"{readout}_{k}": v for k, v in macro.items()})
        tracker.log_metrics(metrics, step=1)
        tracker.log_artifact(folder)
        tracker.finish()
        runs[cell.cell_id] = {"config": cell.label, "seed": seed, "metrics": metrics, "labels": labels,
                              **{readout: scores for readout, scores in readouts.items()}}
    parent.finish()
    return {"parent": parent.run_id, "runs": runs}


def _report(uri: str, out: Path, matrix: str, *extra: str) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["report", "--matrix", matrix, "--tracking-uri", uri, "--out", str(out), "--bootstrap", "300",
                     *extra])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("seeds")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri)
    ok = _log_matrix(uri, root, "seeds_ok", planted_sdpa=0.0, probe=True)
    broken = _log_matrix(uri, root, "seeds_broken", planted_sdpa=1.2, probe=False)
    reports = {name: _report(uri, root / "reports" / name, name) for name in ("seeds_ok", "seeds_broken")}
    reports["probe"] = _report(uri, root / "reports" / "probe", "seeds_ok", "--metric", "probe_auroc",
                                "--no-log")
    return {"uri": uri, "root": root, "ok": ok, "broken": broken, "reports": reports}


def _md(store: dict, name: str) -> str:
    return (store["root"] / "reports" / name / "report.md").read_text()


def _csv(store: dict, name: str, table: str) -> pd.DataFrame:
    return pd.read_csv(store["root"] / "reports" / name / "tables" / f"{table}.csv")


def _macro(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]))


def _seed_means(matrix: dict, readout: str = "zeroshot") -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for run in matrix["runs"].values():
        values.setdefault(run["config"], []).append(_macro(run["labels"], run[readout]))
    return {config: float(np.mean(v)) for config, v in values.items()}


def test_seeds_are_aggregated_per_configuration(store: dict) -> None:
    assert store["reports"]["seeds_ok"][0] == 0
    table = _csv(store, "seeds_ok", "performance").set_index("config")
    assert list(table.index) == [f"{SA}, softmax", f"{SA}, sigmoid", f"{SDPA}, softmax", f"{SDPA}, sigmoid"]
    assert (table["n_seeds"] == 2).all() and (table["seeds"] == "0, 1").all()
    for config, row in table.iterrows():
        logged = [r["metrics"]["zeroshot_auroc"] for r in store["ok"]["runs"].values() if r["config"] == config]
        assert row["auroc"] == pytest.approx(np.mean(logged), abs=1e-9)
        assert row["auroc_sd"] == pytest.approx(np.std(logged, ddof=1), abs=1e-9)
        assert row["auroc_ci_low"] < row["auroc"] < row["auroc_ci_high"]
    md = _md(store, "seeds_ok")
    assert f"| {SA}, softmax | 2 | " in md  # one row per configuration, its seed count beside it


def test_effects_have_cis_and_holm_adjusted_p(store: dict) -> None:
    means = _seed_means(store["ok"])
    effects = _csv(store, "seeds_ok", "component_effects").set_index("axis")
    m = {(a, loss): means[f"{a}, {loss}"] for a in (SA, SDPA) for loss in ("softmax", "sigmoid")}
    loss = ((m[SA, "sigmoid"] - m[SA, "softmax"]) + (m[SDPA, "sigmoid"] - m[SDPA, "softmax"])) / 2
    attention = ((m[SDPA, "softmax"] - m[SA, "softmax"]) + (m[SDPA, "sigmoid"] - m[SA, "sigmoid"])) / 2
    assert effects.loc["loss", "delta"] == pytest.approx(loss, abs=1e-9)
    assert effects.loc["attention", "delta"] == pytest.approx(attention, abs=1e-9)
    assert effects.loc["loss", "ci_low"] > 0 and effects.loc["loss", "p_adj"] < 0.05
    assert effects.loc["attention", "ci_low"] < 0 < effects.loc["attention", "ci_high"]
    assert (effects["n_seeds"] == 2).all() and (effects["mde"] > 0).all()
    np.testing.assert_allclose(effects["p_adj"], multipletests(effects["p_value"], method="holm")[1])
    comparisons = _csv(store, "seeds_ok", "performance").set_index("config").dropna(subset=["p_value"])
    assert len(comparisons) == 3
    np.testing.assert_allclose(comparisons["p_adj"], multipletests(comparisons["p_value"], method="holm")[1])
    interactions = _csv(store, "seeds_ok", "interactions")
    expected = (m[SDPA, "sigmoid"] - m[SA, "sigmoid"]) - (m[SDPA, "softmax"] - m[SA, "softmax"])
    assert len(interactions) == 1 and interactions.loc[0, "delta"] == pytest.approx(expected, abs=1e-9)
    assert interactions.loc[0, "ci_low"] <= interactions.loc[0, "delta"] <= interactions.loc[0, "ci_high"]


def test_findings_sentences_lead_the_report(store: dict) -> None:
    md = _md(store, "seeds_ok")
    effects = _csv(store, "seeds_ok", "component_effects").set_index("axis")
    assert md.index("## Findings (Zero-shot AUROC)") < md.index("## Performance")
    loss = effects.loc["loss"]
    sentence = (f"- sigmoid vs softmax (loss): Δ AUROC {loss['delta']:+.3f} [{loss['ci_low']:+.3f}, "
                f"{loss['ci_high']:+.3f}], p_adj ")
    assert sentence in md
    assert re.search(r"sigmoid vs softmax \(loss\): .*, 2 seeds: better \(significant after Holm\)\.", md)
    assert re.search(r"- SDPA vs SA \(attention\): Δ AUROC [-+]0\.\d{3} \[-0\.\d{3}, \+0\.\d{3}\], p_adj [\d.]+, "
                     r"2 seeds: no detectable effect\.", md)
    assert "Smallest detectable |Δ AUROC| (80 % power, α 0.05" in md
    assert f"{effects['mde'].min():.3f} for a main effect" in md
    assert "## Two-way interactions" in md and "two-level bootstrap (300 resamples)" in md


def test_negative_control_passes_when_sdpa_matches_standard(store: dict) -> None:
    md = _md(store, "seeds_ok")
    assert re.search(r"Negative control \(SDPA vs SA attention, the same math, 2 matched pair\(s\), 2 seeds\): "
                     r"Δ AUROC .*; the CI contains 0: passed\.", md)
    assert "Warning" not in md and "WARNING" not in store["reports"]["seeds_ok"][1]
    parent = MlflowClient(store["uri"]).get_run(store["ok"]["parent"]).data.metrics
    assert parent["negative_control_passed"] == 1.0


def test_a_failed_negative_control_warns_at_the_top(store: dict) -> None:
    code, printed = store["reports"]["seeds_broken"]
    assert code == 0
    md = _md(store, "seeds_broken")
    first = md.split("\n\n")[1]
    assert first.startswith("> **Warning — Negative control (SDPA vs SA attention") and "FAILED" in first
    assert "note: WARNING: Negative control" in printed and "FAILED" in printed
    parent = MlflowClient(store["uri"]).get_run(store["broken"]["parent"]).data.metrics
    assert parent["negative_control_passed"] == 0.0


def test_probe_readout_beside_zero_shot(store: dict) -> None:
    table = _csv(store, "seeds_ok", "performance").set_index("config")
    probe = _seed_means(store["ok"], "probe")
    for config, row in table.iterrows():
        logged = [r["metrics"]["probe_auroc"] for r in store["ok"]["runs"].values() if r["config"] == config]
        assert row["probe_auroc"] == pytest.approx(np.mean(logged), abs=1e-9)
        assert row["probe_auroc"] == pytest.approx(probe[config], abs=1e-9)
        assert row["probe_auroc_ci_low"] < row["probe_auroc"] < row["probe_auroc_ci_high"]
    header = next(line for line in _md(store, "seeds_ok").splitlines() if line.startswith("| Configuration | Seeds"))
    assert "| AUROC |" in header and "| Probe AUROC |" in header


def test_probe_as_the_main_metric(store: dict) -> None:
    code, _ = store["reports"]["probe"]
    assert code == 0
    md = _md(store, "probe")
    assert "## Findings (Probe AUROC)" in md and "--metric probe_auroc" in md
    table = _csv(store, "probe", "performance").set_index("config")
    probe = _seed_means(store["ok"], "probe")
    assert table.loc[f"{SA}, sigmoid", "delta_bootstrap"] == pytest.approx(
        probe[f"{SA}, sigmoid"] - probe[f"{SA}, softmax"], abs=1e-9)
    assert table["zeroshot_auroc"].notna().all()  # zero-shot now the side column
    header = next(line for line in md.splitlines() if line.startswith("| Configuration | Seeds"))
    assert "| Zero-shot AUROC |" in header


def test_runs_without_probe_still_report_zero_shot_with_a_note(store: dict) -> None:
    md = _md(store, "seeds_broken")
    table = _csv(store, "seeds_broken", "performance")
    assert table["auroc"].notna().all() and table["probe_auroc"].isna().all()
    header = next(line for line in md.splitlines() if line.startswith("| Configuration | Seeds"))
    assert "Probe" not in header
    notes = [line for line in md.splitlines() if "probe_predictions.csv" in line]
    assert notes == ["- no run has probe_predictions.csv (runs logged before the probe readout): the report shows "
                     "zero-shot only"]


def test_baseline_mean_and_ci_are_headline_metrics(store: dict) -> None:
    parent = MlflowClient(store["uri"]).get_run(store["ok"]["parent"]).data
    table = _csv(store, "seeds_ok", "performance").set_index("config").loc[f"{SA}, softmax"]
    assert parent.metrics["baseline_zeroshot_auroc"] == pytest.approx(table["auroc"])
    assert parent.metrics["baseline_zeroshot_auroc_ci_low"] == pytest.approx(table["auroc_ci_low"])
    assert parent.metrics["baseline_zeroshot_auroc_ci_high"] == pytest.approx(table["auroc_ci_high"])
    assert parent.metrics["baseline_seeds"] == 2 and parent.metrics["configurations"] == 4
    assert parent.metrics["runs"] == 8 and parent.tags["report_metric"] == "zeroshot_auroc"


def test_unknown_metric_names_the_closest(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["report", "--matrix", "seeds_ok", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--metric", "zeroshot_aurco"])
    assert code == 2
    assert "did you mean 'zeroshot_auroc'" in capsys.readouterr().err
    code = main(["report", "--matrix", "seeds_broken", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--metric", "probe_auroc"])
    err = capsys.readouterr().err
    assert code == 2 and "no run of this matrix logged probe_auroc" in err and "zeroshot_auroc" in err
    code = main(["report", "--matrix", "seeds_ok", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--bootstrap", "1"])
    assert code == 2 and "at least 10 resamples" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_real_matrix_with_two_seeds_end_to_end(tmp_path: Path) -> None:
    """A real matrix (standard vs SDPA attention, ``repeats: 2``) trained by ``ctlab matrix run`` on synthetic
    CT-RATE, then reported: the seeds become replicates and the SA / SDPA control is evaluated on real runs."""
    import yaml

    assert main(["data", "synth", "--out", str(tmp_path / "data" / "root"), "--train", "12", "--valid", "8",
                 "--seed", "3"]) == 0
    matrix = {"name": "seeds_real", "base": tiny_run(tmp_path / "data", tmp_path / "runs", 4),
              "axes": {"model.attention": ["standard", "sdpa"]}, "repeats": 2,
              "baseline": {"model.attention": "standard"}}
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["matrix", "run", str(path), "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path}/optuna.db",
                 "--no-progress"]) == 0
    code, printed = _report(uri, tmp_path / "report", "seeds_real")
    assert code == 0, printed
    table = pd.read_csv(tmp_path / "report" / "tables" / "performance.csv")
    assert list(table["n_seeds"]) == [2, 2] and list(table["seeds"]) == ["0, 1", "0, 1"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Negative control (SDPA vs SA attention, the same math, 1 matched pair(s), 2 seeds)" in md
    assert "the CI contains 0: passed." in md and "Warning" not in md
    assert "SDPA vs SA (attention): Δ AUROC" in md
