"""A matrix's report from its MLflow runs: tables (md, tex, csv), figures (png) and ``report.md``.

``build_report`` only reads the tracking store: it never trains, never
evaluates a model and never creates a run. The paper's numbers printed
beside ours come from ``analysis/reference.yaml``.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis import figures
from analysis.formats import (
    effect_display,
    efficiency_display,
    markdown_table,
    performance_display,
    reference_efficiency_display,
    reference_performance_display,
    write_table,
)
from analysis.runs import (
    PER_LABEL_ARTIFACT,
    PREDICTIONS_ARTIFACT,
    NoRunsError,
    artifact_frame,
    declared_baseline,
    load_runs,
    matrix_parent,
    metric_histories,
)
from analysis.tables import (
    METRICS,
    baseline_first,
    choose_baseline,
    declared_match,
    effect_table,
    efficiency_baseline,
    efficiency_table,
    per_pathology_table,
    performance_table,
    significance_table,
)

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).with_name("reference.yaml")
PROTOCOLS = {
    "ctclip": "CT-CLIP's threshold per pathology: of 100 in [0, 1], the one closest to the ROC's top-left corner",
    "fixed0.5": "a fixed threshold of 0.5 per pathology",
    "youden": "the threshold maximising Youden's J per pathology",
}


@dataclass
class Report:
    """What ``build_report`` wrote: report.md, each table's files, each figure, and the runs it read."""

    path: Path
    tables: dict[str, dict[str, Path]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    headline: dict[str, float] = field(default_factory=dict)  # metrics for the matrix's parent run
    headline_tags: dict[str, str] = field(default_factory=dict)  # which configurations they belong to

    def files(self) -> list[Path]:
        """Every file this report wrote: report.md, then each table's files and each figure."""
        return [self.path, *(p for paths in self.tables.values() for p in paths.values()), *self.figures.values()]


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    """The paper's reference rows (performance and efficiency) from the YAML data file."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _protocol_text(protocols: pd.Series) -> str:
    names = [p for p in dict.fromkeys(protocols.dropna())]
    if not names:
        return "not logged (runs have no eval.protocols param)"
    return "; ".join(f"`{p}` ({PROTOCOLS.get(p, 'threshold protocol ' + p)})" for p in names)


def _artifacts(tracking_uri: str, runs: pd.DataFrame, name: str, notes: list[str]) -> dict[str, pd.DataFrame | None]:
    frames = {row.config: artifact_frame(tracking_uri, row.run_id, name) for row in runs.itertuples()}
    missing = [config for config, frame in frames.items() if frame is None]
    if missing:
        notes.append(f"{name} missing for: {'; '.join(missing)}")
    return frames


def _efficiency_runs(tracking_uri: str, matrix: str) -> pd.DataFrame | None:
    """The matrix's efficiency runs (``ctlab.kind=efficiency``, in any experiment; ``efficiency`` by default)."""
    try:
        return load_runs(tracking_uri, matrix, kind="efficiency")
    except NoRunsError:
        return None


def _links(paths: dict[str, Path], out: Path) -> str:
    return " · ".join(f"[{kind.upper()}]({path.relative_to(out).as_posix()})" for kind, path in paths.items())


def _figure_md(out: Path, path: Path | None, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})\n" if path else ""


def _baseline(runs: pd.DataFrame, label: str | None, declared: dict[str, str] | None) -> tuple[str, str]:
    """The baseline configuration and where that choice came from (for the report's text)."""
    base = choose_baseline(runs, label, declared)
    if label:
        return base, "chosen with --baseline"
    if declared and declared_match(runs, declared)[runs["config"] == base].any():
        return base, "the matrix's declared baseline"
    return base, "the configuration closest to CT-CLIP's components"


def build_report(tracking_uri: str, matrix: str, out: str | Path, baseline: str | None = None,
                 bootstrap: int = 1000, seed: int = 0) -> Report:
    """Read ``matrix``'s finished runs from ``tracking_uri`` and write the report into ``out``.

    ``baseline`` is a configuration label ("SA+GELU+LN, softmax"); by default
    the matrix's declared baseline (the ``baseline:`` of the matrix YAML logged
    on its parent run), else the configuration closest to CT-CLIP's. ``bootstrap`` resamples go into
    each paired significance test against the baseline.
    """
    out = Path(out)
    runs = load_runs(tracking_uri, matrix)
    left_out = dict(runs.attrs.get("left_out", {}))
    parent = matrix_parent(tracking_uri, matrix)
    base, base_source = _baseline(runs, baseline, declared_baseline(tracking_uri, parent) if parent else None)
    runs = baseline_first(runs, base)
    report = Report(out / "report.md", run_ids=list(runs["run_id"]))
    tables_dir, figures_dir = out / "tables", out / "figures"
    notes = report.notes
    if left_out:
        notes.append(f"runs left out because they are not FINISHED: {left_out}")

    per_label = _artifacts(tracking_uri, runs, PER_LABEL_ARTIFACT, notes)
    predictions = _artifacts(tracking_uri, runs, PREDICTIONS_ARTIFACT, notes)
    significance, significance_notes = significance_table(runs, base, predictions, n=bootstrap, seed=seed)
    notes.extend(significance_notes)
    performance = performance_table(runs, base, significance)
    protocol = _protocol_text(performance["protocol"])
    first_protocol = next(iter(performance["protocol"].dropna()), "unknown")
    tested = f"; Δ AUROC CI and p from a paired bootstrap ({bootstrap} resamples) of the same volumes" \
        if significance is not None else ""
    caption = (f"Zero-shot classification, matrix {matrix}: macro means over the pathologies, protocol "
               f"{first_protocol}; 95 % bootstrap CIs in brackets where logged; Δ AUROC vs the baseline ({base})"
               f"{tested}.")
    report.tables["performance"] = write_table(performance, performance_display(performance, base), tables_dir,
                                               "performance", caption)

    effects = effect_table(runs, base)
    if not effects.empty:
        report.tables["effects"] = write_table(
            effects, effect_display(effects), tables_dir, "component_effects",
            f"Per-component effect, matrix {matrix}: mean Δ AUROC of each value against the baseline's value over "
            "matched cells (identical except on that axis).")

    pathology = per_pathology_table(runs, per_label)
    if not pathology.empty:
        tables_dir.mkdir(parents=True, exist_ok=True)
        pathology.to_csv(tables_dir / "per_pathology_auroc.csv")
        report.tables["per_pathology"] = {"csv": tables_dir / "per_pathology_auroc.csv"}
        report.figures["heatmap"] = figures.pathology_heatmap(pathology, figures_dir / "per_pathology_auroc.png")
    efficiency_runs = _efficiency_runs(tracking_uri, matrix)
    styles = figures.looks(pd.concat([runs, efficiency_runs]) if efficiency_runs is not None else runs)
    if performance[list(METRICS)].notna().any().any():
        report.figures["metrics"] = figures.metric_bars(performance, figures_dir / "metrics.png", first_protocol,
                                                        styles)
    else:
        notes.append("no zero-shot metrics (zeroshot_auroc, ...) were logged by these runs")

    best = performance.loc[performance["auroc"].idxmax(), "config"] if performance["auroc"].notna().any() else base
    roles = {base: "baseline"} if best == base else {best: "best (highest AUROC)", base: "baseline"}
    auroc = performance.set_index("config")["auroc"]
    report.parent_run_id = parent
    report.headline = {k: float(v) for k, v in {
        "best_zeroshot_auroc": auroc.get(best), "baseline_zeroshot_auroc": auroc.get(base),
        "best_vs_baseline_delta_auroc": auroc.get(best) - auroc.get(base), "configurations": len(runs),
    }.items() if v is not None and pd.notna(v)}
    report.headline_tags = {"best_config": best, "baseline_config": base}
    shown = {config: predictions[config] for config in roles if predictions.get(config) is not None}
    if shown:
        report.figures["roc"] = figures.roc_curves(shown, roles, figures_dir / "roc_best_vs_baseline.png",
                                                      styles)

    loss = metric_histories(tracking_uri, runs, "train_loss")
    validation = metric_histories(tracking_uri, runs, "zeroshot_auroc")
    if loss.empty and validation.empty:
        notes.append("no train_loss or zeroshot_auroc history was logged; no training curves")
    else:
        report.figures["curves"] = figures.training_curves(loss, validation, list(runs["config"]),
                                                           figures_dir / "training_curves.png", styles)

    efficiency = None
    if efficiency_runs is not None:
        efficiency = efficiency_table(efficiency_runs, efficiency_baseline(efficiency_runs, runs, base))
        report.run_ids += list(efficiency["run_id"])
        report.tables["efficiency"] = write_table(
            efficiency, efficiency_display(efficiency), tables_dir, "efficiency",
            f"Efficiency, matrix {matrix}: peak memory (change vs {efficiency['config'].iloc[0]}), visual-encoder "
            "forward / backward and training-step time (median of repeats), speed-up = baseline step / step.")
        report.figures["efficiency"] = figures.efficiency_bars(efficiency, figures_dir / "efficiency.png", styles)

    markdown = render_markdown(
        matrix=matrix, tracking_uri=tracking_uri, out=out, runs=runs, base=base, performance=performance,
        protocol=protocol, effects=effects, efficiency=efficiency, report=report,
        parent_run_id=parent, reference=load_reference(), bootstrap=bootstrap, base_source=base_source,
    )
    out.mkdir(parents=True, exist_ok=True)
    report.path.write_text(markdown, encoding="utf-8")
    for note in notes:
        log.info(note)
    return report


def render_markdown(*, matrix: str, tracking_uri: str, out: Path, runs: pd.DataFrame, base: str,
                    performance: pd.DataFrame, protocol: str, effects: pd.DataFrame,
                    efficiency: pd.DataFrame | None, report: Report, parent_run_id: str | None,
                    reference: dict[str, Any], bootstrap: int, base_source: str) -> str:
    """``report.md``: where the numbers come from, every table inline, links to the files and figures."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parent = f", parent run `{parent_run_id}`" if parent_run_id else ""
    lines = [
        f"# Ablation report: {matrix}", "",
        f"Generated {now} by `ctlab report --matrix {matrix}` from the MLflow tracking store `{tracking_uri}`"
        f"{parent}: {len(runs)} finished configuration(s). Regenerating this report reads runs only; it trains "
        "nothing.", "",
        f"Zero-shot protocol: {protocol}. Prompts \"{{pathology}} is present.\" / \"{{pathology}} is not present.\", "
        "score = softmax over the pair.", "",
        "## Performance", "",
        markdown_table(performance_display(performance, base)),
        f"Baseline: **{base}** ({base_source}). Brackets: 95 % bootstrap CIs as logged by each run. "
        + (f"Δ AUROC brackets and p: paired bootstrap ({bootstrap} resamples of the same validation volumes), "
           "two-sided." if "p_value" in performance else "Δ AUROC: difference of the logged macro AUROCs "
           "(no paired test; see notes)."), "",
        f"Files: {_links(report.tables['performance'], out)}", "",
        f"### Reference: {reference['source']} — the paper's numbers, not this matrix's", "",
        f"*{reference['setting']}*", "",
        markdown_table(reference_performance_display(reference["performance"])),
        "## Per-component effects", "",
    ]
    if "effects" in report.tables:
        lines += [markdown_table(effect_display(effects)),
                  "Each row: mean over matched cells (identical in every other component and varying param) of "
                  "AUROC(value) − AUROC(baseline value).", "", f"Files: {_links(report.tables['effects'], out)}", ""]
    else:
        lines += ["No component varies across the finished configurations.", ""]
    lines += ["## Figures", "",
              _figure_md(out, report.figures.get("heatmap"), "per-pathology AUROC heat-map"),
              _figure_md(out, report.figures.get("metrics"), "metric bars with 95 % CIs"),
              _figure_md(out, report.figures.get("roc"), "ROC curves of the best and the baseline configuration"),
              _figure_md(out, report.figures.get("curves"), "training loss and validation AUROC curves"), ""]
    if "per_pathology" in report.tables:
        lines += [f"Per-pathology AUROC values: {_links(report.tables['per_pathology'], out)}", ""]
    lines += ["## Efficiency", ""]
    if efficiency is not None:
        lines += [markdown_table(efficiency_display(efficiency)),
                  f"Files: {_links(report.tables['efficiency'], out)}", "",
                  _figure_md(out, report.figures.get("efficiency"), "peak memory and step time")]
    else:
        lines += [f"No efficiency runs (`ctlab.kind=efficiency`) were logged for matrix `{matrix}`; "
                  "produce them with `ctlab bench model --matrix FILE`.", ""]
    lines += [f"### Reference: {reference['source']} efficiency — the paper's numbers (same GPU, same batch)", "",
              markdown_table(reference_efficiency_display(reference["efficiency"])),
              "## Runs", "",
              markdown_table(pd.DataFrame({"Configuration": runs["config"], "cell id": runs["cell_id"],
                                           "run id": runs["run_id"],
                                           "started": runs["start_time"].astype(str).str[:19]}))]
    if efficiency is not None:
        lines += ["Efficiency runs:", "",
                  markdown_table(efficiency[["config", "cell_id", "run_id"]].set_axis(
                      ["Configuration", "cell id", "run id"], axis=1))]
    if report.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in report.notes], ""]
    return "\n".join(lines)
