"""Analysis tables and their text forms on hand-built run frames (no MLflow): labels, effects, formats."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.figures import looks
from analysis.formats import (
    efficiency_display,
    latex_escape,
    latex_table,
    markdown_table,
    performance_display,
    significant,
)
from analysis.runs import first_protocol, run_params
from analysis.tables import choose_baseline, effect_table, efficiency_table, performance_table
from core.naming import AXES, component_values, config_label
from core.registry import ConfigError


def _runs(rows: list[dict]) -> pd.DataFrame:
    """A load_runs-shaped frame: params.*, metrics.*, config, cell_id, run_id, protocol, component.*."""
    records = []
    for i, row in enumerate(rows):
        params = {f"model.{k}": v for k, v in row.items() if k in AXES}
        params.update(row.get("params", {}))
        values = component_values(params)
        record = {"run_id": f"run{i}", "cell_id": f"cell{i}", "config": config_label(values), "protocol": "ctclip"}
        record.update({f"params.{k}": v for k, v in params.items()})
        record.update({f"component.{a}": values[a] for a in AXES})
        record.update({f"metrics.{k}": v for k, v in row.get("metrics", {}).items()})
        records.append(record)
    frame = pd.DataFrame(records)
    repeated = frame["config"].duplicated(keep=False)  # distinct configurations, as load_runs labels them
    frame.loc[repeated, "config"] = frame.loc[repeated, "config"] + " [" + frame.loc[repeated, "cell_id"] + "]"
    return frame


@pytest.mark.parametrize(("params", "label"), [
    ({"model.attention": "standard", "model.mlp": "gelu", "model.norm": "layernorm", "model.loss": "clip"},
     "SA+GELU+LN, softmax"),
    ({"model.attention": "flash", "model.mlp": "swiglu", "model.norm": "rmsnorm", "model.loss": "siglip"},
     "FA+SwiGLU+RMSNorm, sigmoid"),
    ({"model.attention": "sdpa", "model.mlp": "geglu", "model.norm": "layernorm", "model.loss": "clip",
      "model.adaptation": "lora"}, "SDPA+GEGLU+LN, softmax, lora"),
    ({"model.encoder": "vit3d", "model.attention": "sdpa", "model.mlp": "gelu", "model.norm": "rmsnorm"},
     "vit3d SDPA+GELU+RMSNorm, softmax"),
    ({"model.attention": "None", "model.mlp": "None", "model.norm": "None", "model.loss": "siglip"},
     "SDPA+GEGLU+LN, sigmoid"),  # unset axes: CT-ViT's registered defaults
    ({"model.encoder": "no_such_encoder", "model.attention": "None", "model.loss": "clip"}, "no_such_encoder, softmax"),
])
def test_config_label_from_params(params: dict, label: str) -> None:
    assert config_label(component_values(params)) == label


def test_efficiency_params_and_protocol_parsing() -> None:
    row = pd.Series({"params.config.model.attention": "flash", "params.train.lr": "0.1", "params.x": np.nan})
    assert run_params(row) == {"model.attention": "flash", "train.lr": "0.1"}
    assert first_protocol("['fixed0.5', 'ctclip']") == "fixed0.5"
    assert first_protocol("ctclip") == "ctclip"
    assert first_protocol(np.nan) is None


def test_effect_table_matches_cells_on_every_other_varying_param() -> None:
    # attention × lr; a flash cell at lr 0.01 has no standard partner and must not count
    auroc = {("standard", "1e-4"): 0.60, ("flash", "1e-4"): 0.64, ("standard", "1e-3"): 0.55,
             ("flash", "1e-3"): 0.52, ("flash", "1e-2"): 0.90}
    rows = [{"attention": a, "mlp": "gelu", "norm": "layernorm", "loss": "clip",
             "params": {"train.lr": lr, "name": f"cell-{a}-{lr}", "tracking.run_name": f"r{i}",
                        "attention": a, "loss": "clip"},  # the short search keys real runs carry too
             "metrics": {"zeroshot_auroc": v}} for i, ((a, lr), v) in enumerate(auroc.items())]
    runs = _runs(rows)
    effects = effect_table(runs, baseline=runs["config"].iloc[0])
    assert list(effects["axis"]) == ["attention"]
    row = effects.iloc[0]
    assert (row["baseline_value"], row["value"], row["n_pairs"]) == ("standard", "flash", 2)
    assert row["mean_delta"] == pytest.approx(((0.64 - 0.60) + (0.52 - 0.55)) / 2)
    assert (row["min_delta"], row["max_delta"]) == pytest.approx((0.52 - 0.55, 0.64 - 0.60))


def test_effect_table_reports_an_axis_without_matched_cells() -> None:
    rows = [{"attention": "standard", "mlp": "gelu", "norm": "layernorm", "loss": "clip",
             "metrics": {"zeroshot_auroc": 0.6}},
            {"attention": "flash", "mlp": "swiglu", "norm": "rmsnorm", "loss": "clip",
             "metrics": {"zeroshot_auroc": 0.7}}]
    effects = effect_table(_runs(rows), "SA+GELU+LN, softmax").set_index("axis")
    assert set(effects.index) == {"attention", "mlp", "norm"}
    assert (effects["n_pairs"] == 0).all() and effects["mean_delta"].isna().all()


def test_performance_table_and_display() -> None:
    rows = [{"attention": "standard", "mlp": "gelu", "norm": "layernorm", "loss": "clip",
             "metrics": {"zeroshot_auroc": 0.6, "zeroshot_auroc_ci_low": 0.55, "zeroshot_auroc_ci_high": 0.65,
                         "zeroshot_f1": 0.45}},
            {"attention": "standard", "mlp": "gelu", "norm": "layernorm", "loss": "siglip",
             "metrics": {"zeroshot_auroc": 0.62, "zeroshot_f1": 0.47}}]
    runs = _runs(rows)
    table = performance_table(runs, "SA+GELU+LN, softmax")
    assert table["delta"].tolist() == pytest.approx([0.0, 0.02])
    assert table["n_seeds"].tolist() == [1, 1]
    assert table["recall"].isna().all()  # never logged → NaN, never invented
    shown = performance_display(table, "SA+GELU+LN, softmax")
    assert shown.loc[0, "AUROC"] == "0.600 [0.550, 0.650]" and shown.loc[1, "AUROC"] == "0.620"
    assert shown.loc[0, "Recall"] == "–" and shown.loc[0, "Δ AUROC"] == "baseline"
    assert shown.loc[1, "Δ AUROC"] == "+0.020" and "p" not in shown and shown.loc[1, "Seeds"] == "1"
    assert "Probe AUROC" not in shown  # no run logged the probe readout
    comparisons = pd.DataFrame({"config": ["SA+GELU+LN, sigmoid"], "delta_ci_low": [-0.01],
                                "delta_ci_high": [0.05], "p_value": [0.0004], "p_adj": [0.0012],
                                "delta_bootstrap": [0.021]})
    shown = performance_display(performance_table(runs, "SA+GELU+LN, softmax", comparisons=comparisons),
                                "SA+GELU+LN, softmax")
    assert shown.loc[1, "Δ AUROC"] == "+0.021 [-0.010, +0.050]" and shown.loc[1, "p"] == "<0.001"
    assert shown.loc[1, "p (Holm)"] == "0.001"


def test_seeds_of_a_configuration_are_aggregated() -> None:
    """Two seeds of each configuration: one row each, mean and sd over seeds, a t interval over the seeds
    when no predictions are at hand, and the probe readout beside the zero-shot one."""
    rows = [{"attention": "standard", "mlp": "gelu", "norm": "layernorm", "loss": loss,
             "metrics": {"zeroshot_auroc": auroc, "probe_auroc": probe}}
            for loss, auroc, probe in (("clip", 0.60, 0.80), ("clip", 0.64, 0.84), ("siglip", 0.70, 0.90),
                                       ("siglip", 0.66, 0.86))]
    runs = _runs(rows)
    runs["config"] = runs["config"].str.replace(r" \[cell\d\]", "", regex=True)  # seeds share the label
    table = performance_table(runs, "SA+GELU+LN, softmax").set_index("config")
    assert table["n_seeds"].tolist() == [2, 2]
    assert table.loc["SA+GELU+LN, softmax", "auroc"] == pytest.approx(0.62)
    assert table.loc["SA+GELU+LN, softmax", "auroc_sd"] == pytest.approx(np.std([0.60, 0.64], ddof=1))
    half = stats.t.ppf(0.975, 1) * np.std([0.60, 0.64], ddof=1) / np.sqrt(2)
    assert (table.loc["SA+GELU+LN, softmax", "auroc_ci_low"], table.loc["SA+GELU+LN, softmax", "auroc_ci_high"]) \
        == pytest.approx((0.62 - half, 0.62 + half))
    assert table.loc["SA+GELU+LN, sigmoid", "delta"] == pytest.approx(0.06)
    assert table.loc["SA+GELU+LN, sigmoid", "probe_auroc"] == pytest.approx(0.88)
    shown = performance_display(table.reset_index(), "SA+GELU+LN, softmax")
    assert shown.loc[1, "Probe AUROC"].startswith("0.880 [") and shown.loc[1, "Seeds"] == "2"
    probe = performance_table(runs, "SA+GELU+LN, softmax", metric="probe_auroc").set_index("config")
    assert probe.loc["SA+GELU+LN, sigmoid", "auroc"] == pytest.approx(0.88)  # the main readout is the probe
    assert probe.loc["SA+GELU+LN, sigmoid", "zeroshot_auroc"] == pytest.approx(0.68)
    assert probe.loc["SA+GELU+LN, sigmoid", "delta"] == pytest.approx(0.06)


def test_choose_baseline() -> None:
    runs = pd.DataFrame({"config": ["SA+GELU+LN, softmax", "FA+GELU+LN, softmax"]})
    assert choose_baseline(runs) == "SA+GELU+LN, softmax"
    assert choose_baseline(runs, "FA+GELU+LN, softmax") == "FA+GELU+LN, softmax"
    with pytest.raises(ConfigError, match="did you mean 'FA\\+GELU\\+LN, softmax'"):
        choose_baseline(runs, "FA+GELU+LN, sofmax")
    runs["params.model.attention"] = ["standard", "flash"]
    assert choose_baseline(runs, declared={"model.attention": "flash"}) == "FA+GELU+LN, softmax"
    assert choose_baseline(runs, declared={"model.attention": "sdpa"}) == "SA+GELU+LN, softmax"  # no match: first


def test_efficiency_speedup_and_memory_change() -> None:
    eff = pd.DataFrame({"config": ["FA", "SA"], "cell_id": ["b", "a"], "run_id": ["r2", "r1"],
                        "metrics.peak_memory_mb": [90.95, 118.98], "metrics.step_ms": [1234.89, 1311.98]})
    table = efficiency_table(eff, baseline="SA")
    assert list(table["config"]) == ["SA", "FA"]
    assert table.loc[1, "memory_change_pct"] == pytest.approx(-23.56, abs=0.01)  # the paper's −23.6 %
    assert table.loc[1, "step_speedup"] == pytest.approx(1311.98 / 1234.89)
    assert table["gflops"].isna().all()
    # runs logged before the step spread was: the median alone; with it: "median [min–max]"
    assert list(efficiency_display(table)["Step (ms)"]) == ["1311.98", "1234.89"]
    table[["step_ms_min", "step_ms_max"]] = [[1300.0, 1400.5], [1200.0, 1250.25]]
    assert list(efficiency_display(table)["Step (ms)"]) == ["1311.98 [1300.00–1400.50]", "1234.89 [1200.00–1250.25]"]


def test_latex_escaping_and_balance() -> None:
    assert latex_escape("a_b 10% & #1 {x} ~ ^ \\ <0.001") == \
        r"a\_b 10\% \& \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{} \textless{}0.001"
    assert latex_escape("Δ AUROC 1.06× −1") == r"$\Delta$ AUROC 1.06$\times$ -1"
    frame = pd.DataFrame({"Configuration": ["SA_1 (50%)", "FA & co"], "AUROC": ["0.600", "0.610"]})
    tex = latex_table(frame, "Results for run_1", "perf table")
    assert tex.count(r"\begin{tabular}{lr}") == 1 and tex.count(r"\end{tabular}") == 1
    assert re.search(r"\\toprule\nConfiguration & AUROC \\\\\n\\midrule\n", tex)
    assert r"SA\_1 (50\%) & 0.600 \\" in tex and r"FA \& co & 0.610 \\" in tex
    assert r"\caption{Results for run\_1}" in tex and r"\label{tab:perf-table}" in tex
    assert tex.rstrip().endswith(r"\bottomrule" "\n" r"\end{tabular}" "\n" r"\end{table}")


def test_markdown_table() -> None:
    frame = pd.DataFrame({"Configuration": ["a|b", "c"], "AUROC": ["0.600", "–"], "Change": ["SA → FA", "x"]})
    lines = markdown_table(frame).splitlines()
    assert lines == ["| Configuration | AUROC | Change |", "|:---|---:|:---|",
                     r"| a\|b | 0.600 | SA → FA |", "| c | – | x |"]


def _looks_distinct(frame: pd.DataFrame) -> dict:
    styles = looks(frame)
    assert set(styles) == set(frame["config"])
    bars = {(s.facet, s.colour, s.hatch) for s in styles.values()}
    lines = {(s.facet, s.colour, str(s.dashes), s.marker) for s in styles.values()}
    assert len(bars) == len(lines) == len(styles), "two configurations look alike"
    return styles


def test_figure_looks_follow_the_axes_on_the_smoke_matrix() -> None:
    rows = [{"attention": a, "norm": n, "mlp": m, "loss": loss} for a in ("standard", "sdpa")
            for n in ("layernorm", "rmsnorm") for m in ("gelu", "swiglu") for loss in ("clip", "siglip")]
    styles = _looks_distinct(_runs(rows))
    assert {s.facet for s in styles.values()} == {"loss: softmax", "loss: sigmoid"}  # a panel per loss
    assert len({s.colour for s in styles.values()}) == 4  # a colour per norm × mlp block
    assert len({s.hatch for s in styles.values()}) == 2  # a hatching per attention kernel
    same_block = [styles[c] for c in ("SA+GELU+LN, softmax", "SDPA+GELU+LN, softmax")]
    assert same_block[0].colour == same_block[1].colour and same_block[0].hatch != same_block[1].hatch


def test_figure_looks_stay_distinct_for_large_and_repeated_matrices() -> None:
    rows = [{"encoder": e, "attention": a, "norm": n, "mlp": m, "loss": loss}
            for e in ("ctvit", "vit3d") for a in ("standard", "sdpa", "flash") for n in ("layernorm", "rmsnorm")
            for m in ("gelu", "swiglu", "geglu") for loss in ("clip", "siglip")]
    assert len(_looks_distinct(_runs(rows))) == 72
    many = [{"attention": f"kernel{i}", "loss": "clip"} for i in range(25)]  # more kernels than hatchings
    assert len(_looks_distinct(_runs(many))) == 25
    seeds = _runs([{"attention": "standard", "loss": "clip"}] * 3)  # replicates: same components, own labels
    seeds["config"] = [f"SA+GELU+LN, softmax [{i}]" for i in range(3)]
    assert len({s.colour for s in _looks_distinct(seeds).values()}) == 3


def test_significant_figures_keep_a_tiny_models_gflops_readable() -> None:
    assert [significant(v) for v in (0.03124, 12.5, 312.4, 1234.4, None)] == ["0.0312", "12.5", "312", "1234", "–"]
