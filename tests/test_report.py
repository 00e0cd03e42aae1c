"""``ctlab report`` end to end on a real MLflow SQLite store holding a small logged matrix.

The store holds a parent run and four finished cells (attention standard/flash
× loss clip/siglip) with epoch and step metrics and per-label / prediction CSV
artifacts of known values, plus an older and a failed run that must be
ignored, another matrix's run, and two efficiency runs. The report is built
once (module fixture) and each test checks one part of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from analysis.runs import load_runs
from analysis.tables import baseline_first, choose_baseline, effect_table, performance_table
from core.cli import main
from core.data.pathologies import PATHOLOGIES

MATRIX = "ablation_test"
ODD_LABEL = "FA+GELU+LN, sigmoid_v2 (top 10%) & #1"
# cell → (attention, loss, cell_label tag or None, final AUROC, epoch-1 AUROC, signal in the predictions)
CELLS = {
    "c-sa-clip": ("standard", "clip", "SA+GELU+LN, softmax", 0.60, 0.55, 0.5),
    "c-sa-siglip": ("standard", "siglip", None, 0.62, 0.58, 0.8),
    "c-fa-clip": ("flash", "clip", "FA+GELU+LN, softmax", 0.61, 0.52, 0.6),
    "c-fa-siglip": ("flash", "siglip", ODD_LABEL, 0.66, 0.60, 1.5),
}
EFFICIENCY = {  # cell → (peak_memory_mb, visual_fwd_ms, visual_bwd_ms, step_ms)
    "c-sa-clip": (1000.0, 30.0, 60.0, 100.0),
    "c-fa-clip": (800.0, 25.0, 50.0, 80.0),
}
N_VOLUMES = 30


def final_metrics(cell: str) -> dict[str, float]:
    """The last-epoch metrics logged for a cell (distinct per metric so a column mix-up shows)."""
    auroc = CELLS[cell][3]
    return {"zeroshot_auroc": auroc, "zeroshot_auroc_ci_low": auroc - 0.05, "zeroshot_auroc_ci_high": auroc + 0.04,
            "zeroshot_f1": auroc - 0.15, "zeroshot_precision": auroc - 0.30, "zeroshot_recall": auroc + 0.07,
            "zeroshot_auprc": auroc - 0.26, "zeroshot_f1_ci_low": auroc - 0.2, "zeroshot_f1_ci_high": auroc - 0.1}


def per_label_auroc(cell: str) -> np.ndarray:
    """Known per-pathology AUROCs of a cell's ``ctclip`` rows."""
    return np.round(0.5 + 0.01 * np.arange(len(PATHOLOGIES)) + 0.1 * list(CELLS).index(cell) / 4, 4)


def predictions(cell: str) -> pd.DataFrame:
    labels = np.random.default_rng(0).integers(0, 2, size=(N_VOLUMES, len(PATHOLOGIES)))
    labels[0], labels[1] = 0, 1  # both classes in every pathology
    noise = np.random.default_rng(list(CELLS).index(cell) + 1).normal(size=labels.shape)
    scores = 1 / (1 + np.exp(-(CELLS[cell][5] * (labels - 0.5) + noise)))
    return pd.DataFrame({"VolumeName": np.repeat([f"valid_{i}_a_1.nii.gz" for i in range(N_VOLUMES)],
                                                 len(PATHOLOGIES)),
                         "pathology": np.tile(PATHOLOGIES, N_VOLUMES), "score": scores.ravel(),
                         "label": labels.ravel()})


def _params(attention: str, loss: str, cell: str) -> dict[str, str]:
    return {"model.encoder": "ctvit", "model.attention": attention, "model.norm": "layernorm", "model.mlp": "gelu",
            "model.loss": loss, "model.adaptation": "full", "train.lr": "0.0001",
            "eval.protocols": "['ctclip', 'fixed0.5']", "name": f"run-{cell}", "tracking.run_name": cell,
            "attention": attention, "loss": loss}  # the short search keys every training run also carries


def _log_cell(client: MlflowClient, experiment: str, parent: str, cell: str, start: int, folder: Path,
              status: str = "FINISHED", auroc_shift: float = 0.0) -> str:
    attention, loss, label, auroc, first_auroc, _ = CELLS[cell]
    tags = {"ctlab.kind": "train", "matrix": MATRIX, "cell_id": cell, "mlflow.parentRunId": parent}
    if label:
        tags["cell_label"] = label
    run_id = client.create_run(experiment, start_time=start, tags=tags).info.run_id
    metrics = [Metric("train_loss", 2.0 - 0.1 * step + 0.01 * list(CELLS).index(cell), start, step)
               for step in range(1, 11)]
    metrics.append(Metric("zeroshot_auroc", first_auroc, start, 1))
    metrics += [Metric(key, value + auroc_shift, start, 2) for key, value in final_metrics(cell).items()]
    params = [Param(key, value) for key, value in _params(attention, loss, cell).items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    rows = [{"pathology": p, "auroc": a, "auprc": 0.3, "f1": 0.5, "precision": 0.3, "recall": 0.7, "accuracy": 0.6,
             "threshold": 0.5, "protocol": protocol}
            for protocol, values in (("ctclip", per_label_auroc(cell)), ("fixed0.5", np.zeros(len(PATHOLOGIES))))
            for p, a in zip(PATHOLOGIES, values, strict=True)]
    (folder / cell).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / cell / "zeroshot_per_label.csv", index=False)
    predictions(cell).to_csv(folder / cell / "zeroshot_predictions.csv", index=False)
    client.log_artifacts(run_id, str(folder / cell))
    client.set_terminated(run_id, status=status)
    return run_id


def _all_runs(uri: str) -> int:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, max_results=1000))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("ctlab", artifact_location=(root / "artifacts" / "ctlab").as_uri())
    bench = client.create_experiment("efficiency", artifact_location=(root / "artifacts" / "efficiency").as_uri())
    parent = client.create_run(experiment, tags={"ctlab.kind": "matrix", "matrix": MATRIX}).info.run_id
    matrix_yaml = (f"name: {MATRIX}\naxes: {{model.attention: [standard, flash], model.loss: [clip, siglip]}}\n"
                   "baseline: {model.attention: standard, model.loss: clip}\n")
    client.log_text(parent, matrix_yaml, "matrix.yaml")
    start = 1_700_000_000_000
    # an older finished run of the baseline cell and a newer failed run of c-fa-clip: both must be ignored
    _log_cell(client, experiment, parent, "c-sa-clip", start, root / "old", auroc_shift=-0.2)
    run_ids = {cell: _log_cell(client, experiment, parent, cell, start + 1000 * (i + 1), root / "files")
               for i, cell in enumerate(CELLS)}
    _log_cell(client, experiment, parent, "c-fa-clip", start + 9000, root / "failed", status="FAILED",
              auroc_shift=0.3)
    other = client.create_run(experiment, tags={"ctlab.kind": "train", "matrix": "other_matrix", "cell_id": "x"})
    client.set_terminated(other.info.run_id)
    client.set_terminated(parent)
    for cell, (memory, fwd, bwd, step) in EFFICIENCY.items():
        attention = CELLS[cell][0]
        run = client.create_run(bench, tags={"ctlab.kind": "efficiency", "matrix": MATRIX, "cell_id": cell,
                                             "cell_label": CELLS[cell][2]})
        values = {"params_total": 2.5e6, "params_trainable": 2.0e6, "gflops": 12.5, "peak_memory_mb": memory,
                  "visual_fwd_ms": fwd, "visual_bwd_ms": bwd, "step_ms": step, "step_ms_min": step - 5,
                  "step_ms_max": step + 10}
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, start, 0) for k, v in values.items()],
                         params=[Param("config.model.attention", attention)])
        client.set_terminated(run.info.run_id)
    before = _all_runs(uri)
    out = root / "report"
    code = main(["report", "--matrix", MATRIX, "--tracking-uri", uri, "--out", str(out), "--bootstrap", "200"])
    return {"uri": uri, "out": out, "code": code, "run_ids": run_ids, "runs_before": before, "root": root}


def _csv(store: dict, name: str) -> pd.DataFrame:
    return pd.read_csv(store["out"] / "tables" / f"{name}.csv")


def test_performance_csv_holds_the_newest_finished_values(store: dict) -> None:
    assert store["code"] == 0
    table = _csv(store, "performance").set_index("cell_ids")
    assert list(table.index) == ["c-sa-clip", "c-sa-siglip", "c-fa-clip", "c-fa-siglip"]  # baseline first
    assert (table["n_seeds"] == 1).all()
    for cell, run_id in store["run_ids"].items():
        row, logged = table.loc[cell], final_metrics(cell)
        assert row["run_ids"] == run_id  # not the older or the failed run of the same cell
        for metric in ("auroc", "f1", "precision", "recall", "auprc"):
            assert row[metric] == pytest.approx(logged[f"zeroshot_{metric}"], abs=1e-12)
        assert row["auroc_ci_low"] == pytest.approx(logged["zeroshot_auroc_ci_low"], abs=1e-12)
        assert row["f1_ci_high"] == pytest.approx(logged["zeroshot_f1_ci_high"], abs=1e-12)
        assert np.isnan(row["precision_ci_low"])  # not logged → empty, never invented
        assert row["delta"] == pytest.approx(CELLS[cell][3] - CELLS["c-sa-clip"][3], abs=1e-12)
        assert row["protocol"] == "ctclip"
    assert table.loc["c-sa-siglip", "config"] == "SA+GELU+LN, sigmoid"  # derived from params (no tag)
    assert table.loc["c-fa-siglip", "config"] == ODD_LABEL


def _macro_auroc(frame: pd.DataFrame) -> float:
    labels = frame.pivot(index="VolumeName", columns="pathology", values="label")
    scores = frame.pivot(index="VolumeName", columns="pathology", values="score")
    return float(np.mean([roc_auc_score(labels[p], scores[p]) for p in PATHOLOGIES]))


def test_single_seed_comparisons_are_paired_volume_tests(store: dict) -> None:
    """One seed per configuration: Δ of the predictions' macro AUROC (scikit-learn), a CI around it that covers
    volume sampling only, p in (0, 1] and Holm-adjusted p over the three comparisons."""
    table = _csv(store, "performance").set_index("cell_ids")
    base = _macro_auroc(predictions("c-sa-clip"))
    for cell in ("c-sa-siglip", "c-fa-clip", "c-fa-siglip"):
        row = table.loc[cell]
        assert row["delta_bootstrap"] == pytest.approx(_macro_auroc(predictions(cell)) - base, abs=1e-12)
        assert row["delta_ci_low"] < row["delta_bootstrap"] < row["delta_ci_high"]
        assert 0 < row["p_value"] <= row["p_adj"] <= 1
    tested = table.drop("c-sa-clip")
    np.testing.assert_allclose(tested["p_adj"], multipletests(tested["p_value"], method="holm")[1])
    assert table.loc["c-fa-siglip", "delta_bootstrap"] > 0 and table.loc["c-fa-siglip", "p_value"] < 0.001
    assert np.isnan(table.loc["c-sa-clip", "p_value"])  # the baseline is not compared with itself


def test_latex_is_booktabs_balanced_and_escaped(store: dict) -> None:
    for name in ("performance", "component_effects", "efficiency"):
        tex = (store["out"] / "tables" / f"{name}.tex").read_text()
        assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
        assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
        assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
        assert "Δ" not in tex and "×" not in tex
        columns = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
        body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        assert all(row.count(" & ") == len(columns) - 1 and row.endswith(r"\\") for row in body)
    tex = (store["out"] / "tables" / "performance.tex").read_text()
    assert r"FA+GELU+LN, sigmoid\_v2 (top 10\%) \& \#1" in tex
    assert r"95 \% CIs in brackets" in tex and "two-level bootstrap" in tex
    assert "0.660 [0.610, 0.700]" in tex


def test_markdown_report_ties_everything_together(store: dict) -> None:
    md = (store["out"] / "report.md").read_text()
    assert store["uri"] in md and "`ctclip`" in md
    for run_id in store["run_ids"].values():
        assert run_id in md
    assert "| SA+GELU+LN, softmax | 1 | 0.600 [0.550, 0.640] |" in md  # one seed: the run's own logged CI
    assert "Baseline: **SA+GELU+LN, softmax** (the matrix's declared baseline)" in md
    assert "0.604" in md and "118.98 GB" in md and "the paper's numbers" in md  # reference rows, labelled
    for link in re.findall(r"\]\(([^)]+)\)", md):
        assert (store["out"] / link).is_file(), link
    assert "figures/roc_best_vs_baseline.png" in md
    # the fixture's predictions are not those behind its logged AUROCs: the report says so instead of hiding it
    assert "differs from the logged metrics' difference" in md
    assert "runs left out because they are not FINISHED: {'FAILED': 1}" in md


def test_effect_table_equals_hand_computation(store: dict) -> None:
    effects = _csv(store, "component_effects").set_index("axis")
    auroc = {cell: values[3] for cell, values in CELLS.items()}
    flash = ((auroc["c-fa-clip"] - auroc["c-sa-clip"]) + (auroc["c-fa-siglip"] - auroc["c-sa-siglip"])) / 2
    siglip = ((auroc["c-sa-siglip"] - auroc["c-sa-clip"]) + (auroc["c-fa-siglip"] - auroc["c-fa-clip"])) / 2
    assert set(effects.index) == {"attention", "loss"}  # name and tracking.run_name vary but are bookkeeping
    assert effects.loc["attention", "value"] == "flash" and effects.loc["attention", "baseline_value"] == "standard"
    assert effects.loc["attention", "mean_delta"] == pytest.approx(flash, abs=1e-12)
    assert effects.loc["loss", "mean_delta"] == pytest.approx(siglip, abs=1e-12)
    assert (effects["n_pairs"] == 2).all()


def test_per_pathology_and_efficiency_tables(store: dict) -> None:
    pathology = _csv(store, "per_pathology_auroc").set_index("config")
    assert list(pathology.columns) == list(PATHOLOGIES)
    np.testing.assert_allclose(pathology.loc["SA+GELU+LN, sigmoid"].to_numpy(), per_label_auroc("c-sa-siglip"))
    efficiency = _csv(store, "efficiency").set_index("cell_id")
    assert list(efficiency.index) == ["c-sa-clip", "c-fa-clip"]
    assert efficiency.loc["c-fa-clip", "step_speedup"] == pytest.approx(100.0 / 80.0)
    assert efficiency.loc["c-fa-clip", "memory_change_pct"] == pytest.approx(-20.0)
    assert efficiency.loc["c-fa-clip", "visual_bwd_ms"] == 50.0
    md = (store["out"] / "tables" / "efficiency.md").read_text()
    assert "800.00 MB (-20.0 %)" in md and "1.25×" in md
    assert "| 80.00 [75.00–90.00] |" in md  # the step's median with the spread of its repeats


def test_figures_are_real_pngs(store: dict) -> None:
    names = ["per_pathology_auroc", "metrics", "roc_best_vs_baseline", "training_curves", "efficiency"]
    for name in names:
        path = store["out"] / "figures" / f"{name}.png"
        assert path.stat().st_size > 10_000, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600, (name, image.shape)
        assert image[..., :3].std() > 0.05, name  # not a blank canvas


def test_report_is_logged_to_the_matrix_parent_run(store: dict) -> None:
    client = MlflowClient(store["uri"])
    parent = client.search_runs([client.get_experiment_by_name("ctlab").experiment_id],
                                "tags.`ctlab.kind` = 'matrix'")[0]
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "tables", "figures", "matrix.yaml"} <= top
    assert {"tables/performance.csv", "tables/performance.tex", "tables/performance.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert "figures/metrics.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    logged = Path(client.download_artifacts(parent.info.run_id, "report.md", str(store["root"] / "dl")))
    assert logged.read_text() == (store["out"] / "report.md").read_text()
    metrics = parent.data.metrics
    assert metrics["best_zeroshot_auroc"] == pytest.approx(0.66)  # the newest FINISHED runs only
    assert metrics["baseline_zeroshot_auroc"] == pytest.approx(0.60)
    assert metrics["baseline_zeroshot_auroc_ci_low"] == pytest.approx(0.55)
    assert metrics["baseline_zeroshot_auroc_ci_high"] == pytest.approx(0.64)
    assert metrics["best_vs_baseline_delta_zeroshot_auroc"] == pytest.approx(0.06)
    assert metrics["configurations"] == 4
    assert parent.data.tags["best_config"] == ODD_LABEL
    assert parent.data.tags["baseline_config"] == "SA+GELU+LN, softmax"
    assert parent.info.status == "FINISHED"  # logging the report does not reopen the run


def test_report_trains_nothing(store: dict) -> None:
    assert _all_runs(store["uri"]) == store["runs_before"]


def test_unknown_matrix_is_a_clear_error(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["report", "--matrix", "ablation_tset", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "ablation_tset" in err and store["uri"] in err and "ctlab matrix status" in err
    assert "did you mean 'ablation_test'" in err and "other_matrix" in err
    assert not (tmp_path / "report.md").exists()


def test_unknown_baseline_is_a_clear_error(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["report", "--matrix", MATRIX, "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--baseline", "SA+GELU+LN, sofmax"])
    assert code == 2
    assert "did you mean 'SA+GELU+LN, softmax'" in capsys.readouterr().err


def test_another_baseline_changes_deltas_and_effects(store: dict) -> None:
    runs = load_runs(store["uri"], MATRIX)
    base = choose_baseline(runs, "FA+GELU+LN, softmax")
    table = performance_table(baseline_first(runs, base), base).set_index("cell_ids")
    assert table.index[0] == "c-fa-clip"
    assert table.loc["c-sa-clip", "delta"] == pytest.approx(0.60 - 0.61, abs=1e-12)
    effects = effect_table(runs, base).set_index("axis")
    assert effects.loc["attention", "value"] == "standard"  # effects now measured from flash
    assert effects.loc["attention", "mean_delta"] == pytest.approx(-0.025, abs=1e-12)
    assert mlflow.get_tracking_uri() != store["uri"]  # the reader restored mlflow's global tracking URI


def test_bare_runs_still_give_a_report_that_says_what_is_missing(store: dict, tmp_path: Path) -> None:
    code = main(["report", "--matrix", "other_matrix", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    assert code == 0
    md = (tmp_path / "report.md").read_text()
    assert "No efficiency runs (`ctlab.kind=efficiency`) were logged for matrix `other_matrix`" in md
    assert "ctlab bench model --matrix FILE" in md
    assert "zeroshot_predictions.csv missing for: SDPA+GEGLU+LN, softmax" in md  # CT-ViT defaults, derived
    assert "no zero-shot metrics" in md and "not logged (runs have no eval.protocols param)" in md
    assert pd.read_csv(tmp_path / "tables" / "performance.csv")["auroc"].isna().all()
    assert not (tmp_path / "figures").exists()
