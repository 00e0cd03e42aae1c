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
from analysis.contrasts import baseline_contrasts, configurations
from analysis.findings import control_sentence, detectable_sentence, effect_sentence
from analysis.formats import (
    effect_display,
    efficiency_display,
    interaction_display,
    markdown_table,
    metric_title,
    performance_display,
    reference_efficiency_display,
    reference_performance_display,
    write_table,
)
from analysis.readouts import DEFAULT_METRIC, METRIC_KEYS, READOUT_NAMES, READOUTS, build_replicates, parse_metric
from analysis.runs import (
    PER_LABEL_ARTIFACT,
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
    comparison_table,
    control_check,
    declared_match,
    effect_table,
    efficiency_baseline,
    efficiency_table,
    interaction_table,
    per_pathology_table,
    performance_table,
)
from core.registry import ConfigError, closest

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


def _artifacts(tracking_uri: str, runs: pd.DataFrame, name: str,
               notes: list[str] | None) -> dict[str, pd.DataFrame | None]:
    """Artifact ``name`` of every run, keyed by run id; runs without it are listed in one note (when given)."""
    frames = {row.run_id: artifact_frame(tracking_uri, row.run_id, name, optional=notes is None)
              for row in runs.itertuples()}
    missing = list(dict.fromkeys(row.config for row in runs.itertuples() if frames[row.run_id] is None))
    if missing and notes is not None:
        notes.append(f"{name} missing for: {'; '.join(missing)}")
    return frames


def _check_metric(runs: pd.DataFrame, metric: str) -> None:
    """A non-default main metric must have been logged by some run; else a clear error naming what was."""
    parse_metric(metric)
    if metric == DEFAULT_METRIC or f"metrics.{metric}" in runs and runs[f"metrics.{metric}"].notna().any():
        return
    logged = [c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")
              and c[len("metrics."):] in METRIC_KEYS and runs[c].notna().any()]
    raise ConfigError(f"no run of this matrix logged {metric}{closest(metric, logged)} (report metrics these runs "
                      f"logged: {', '.join(logged) or 'none'}); choose one with --metric")


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
                 bootstrap: int = 1000, seed: int = 0, metric: str = DEFAULT_METRIC) -> Report:
    """Read ``matrix``'s finished runs from ``tracking_uri`` and write the report into ``out``.

    ``baseline`` is a configuration label ("SA+GELU+LN, softmax"); by default
    the matrix's declared baseline (the ``baseline:`` of the matrix YAML logged
    on its parent run), else the configuration closest to CT-CLIP's. ``metric``
    is the main metric (``zeroshot_auroc``, ``probe_auroc``, ``zeroshot_f1``, ...):
    the one every Δ, CI, test and finding is about. The runs of a configuration
    at several seeds are its replicates; ``bootstrap`` two-level resamples (seeds,
    then validation volumes shared by all configurations) give every CI and p.
    """
    out = Path(out)
    readout, main = parse_metric(metric)
    if bootstrap < 10:
        raise ConfigError(f"--bootstrap {bootstrap}: a CI needs at least 10 resamples (1000 by default)")
    runs = load_runs(tracking_uri, matrix)
    _check_metric(runs, metric)
    left_out = dict(runs.attrs.get("left_out", {}))
    parent = matrix_parent(tracking_uri, matrix)
    base, base_source = _baseline(runs, baseline, declared_baseline(tracking_uri, parent) if parent else None)
    runs = baseline_first(runs, base)
    report = Report(out / "report.md", run_ids=list(runs["run_id"]))
    tables_dir, figures_dir = out / "tables", out / "figures"
    notes = report.notes
    if left_out:
        notes.append(f"runs left out because they are not FINISHED: {left_out}")
    single = [c for c, n in runs.groupby("config", sort=False).size().items() if n == 1]
    if single and len(single) == runs["config"].nunique():
        notes.append("every configuration has 1 seed: seed variance cannot be estimated, so CIs and p-values "
                     "cover validation-volume sampling only (set `repeats: 2` or more in the matrix)")
    elif single:
        notes.append(f"1 seed only (its CIs borrow the pooled seed variance of the configurations with several "
                     f"seeds): {'; '.join(single)}")

    per_label = _artifacts(tracking_uri, runs, PER_LABEL_ARTIFACT, notes)
    predictions = {name: _artifacts(tracking_uri, runs, artifact, None) for name, artifact in READOUTS.items()}
    replicates, info = {}, {}
    for name in READOUTS:
        key = f"{name}_{main}"
        if not any(frame is not None for frame in predictions[name].values()):
            replicates[name] = None
            if name == readout:
                notes.append(f"{READOUTS[name]} missing for: {'; '.join(dict.fromkeys(runs['config']))}")
            if name == "probe" and readout != "probe":
                notes.append(f"no run has {READOUTS[name]} (runs logged before the probe readout): the report "
                             "shows zero-shot only")
            continue
        replicates[name], rep_notes, info[name] = build_replicates(
            runs, predictions[name], key, n=bootstrap, seed=seed, also=METRICS if name == readout else ())
        notes.extend(rep_notes)
    main_replicates = (replicates.get(readout) or {}).get(main)
    configs = configurations(runs)
    comparisons = comparison_table(main_replicates, baseline_contrasts(configs, base))
    performance = performance_table(runs, base, metric, replicates, comparisons)
    _note_mismatch(performance, notes, metric)
    protocol = _protocol_text(performance["protocol"])
    first_protocol = next(iter(performance["protocol"].dropna()), "unknown")
    title = metric_title(metric)
    tested = (f"; Δ {title}, its 95 % CI and p from a two-level bootstrap ({bootstrap} resamples of seeds and, "
              "within them, the same validation volumes for every configuration), p also Holm-adjusted over the "
              "configurations") if not comparisons.empty else ""
    caption = (f"{READOUT_NAMES[readout].capitalize()} classification, matrix {matrix}: macro means over the "
               f"pathologies, mean over seeds, protocol {first_protocol}; 95 % CIs in brackets (several seeds: "
               f"seeds and volumes; one seed: the run's own volume bootstrap); Δ vs the baseline ({base}){tested}.")
    report.tables["performance"] = write_table(performance, performance_display(performance, base, metric),
                                               tables_dir, "performance", caption)

    effects = effect_table(runs, base, metric, main_replicates)
    if not effects.empty:
        report.tables["effects"] = write_table(
            effects, effect_display(effects, metric), tables_dir, "component_effects",
            f"Per-component main effect, matrix {matrix}: Δ {title} of each value against the baseline's value, "
            "mean over matched cells (identical except on that axis), with its two-level 95 % CI, p, Holm-adjusted "
            "p over the table's rows and the minimal detectable effect (80 % power, α 0.05) where tested.")
    interactions = interaction_table(runs, base, metric, main_replicates)
    if not interactions.empty:
        report.tables["interactions"] = write_table(
            interactions, interaction_display(interactions, metric), tables_dir, "interactions",
            f"Two-way interactions, matrix {matrix}: [Δ of change A with change B] − [Δ of change A alone] in "
            f"{title}, mean over matched sets of four cells; two-level 95 % CI, p and Holm-adjusted p.")
    control = control_check(runs, main_replicates)
    findings = [effect_sentence(row, metric) for _, row in effects.iterrows()]
    detectable = detectable_sentence(effects, comparisons, metric)
    control_text = control_sentence(control, metric)
    if control is not None and control.get("passed") is False:
        notes.insert(0, f"WARNING: {control_text}")

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
                                                        styles, READOUT_NAMES[readout].capitalize())
    else:
        notes.append(f"no {READOUT_NAMES[readout]} metrics ({readout}_auroc, ...) were logged by these runs")

    values = performance.set_index("config")[main]
    best = values.idxmax() if values.notna().any() else base
    roles = {base: "baseline"} if best == base else {best: f"best (highest {title})", base: "baseline"}
    base_row = performance.set_index("config").loc[base]
    report.parent_run_id = parent
    report.headline = {k: float(v) for k, v in {
        f"best_{metric}": values.get(best), f"baseline_{metric}": values.get(base),
        f"baseline_{metric}_ci_low": base_row[f"{main}_ci_low"],
        f"baseline_{metric}_ci_high": base_row[f"{main}_ci_high"],
        f"best_vs_baseline_delta_{metric}": values.get(best) - values.get(base), "configurations": len(configs),
        "runs": len(runs), "baseline_seeds": base_row["n_seeds"],
        "negative_control_passed": None if control is None or control.get("passed") is None else control["passed"],
    }.items() if v is not None and pd.notna(v)}
    report.headline_tags = {"best_config": best, "baseline_config": base, "report_metric": metric}
    first_run = runs.drop_duplicates("config").set_index("config")["run_id"]
    shown = {config: predictions["zeroshot"][first_run[config]] for config in roles
             if predictions["zeroshot"].get(first_run[config]) is not None}
    if shown:
        report.figures["roc"] = figures.roc_curves(shown, roles, figures_dir / "roc_best_vs_baseline.png",
                                                      styles)

    loss, validation = (metric_histories(tracking_uri, runs, key).groupby(["config", "step"], as_index=False,
                                                                         sort=False)["value"].mean()
                        for key in ("train_loss", "zeroshot_auroc"))  # a configuration's seeds: their mean
    if loss.empty and validation.empty:
        notes.append("no train_loss or zeroshot_auroc history was logged; no training curves")
    else:
        report.figures["curves"] = figures.training_curves(loss, validation, list(configs["config"]),
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
        protocol=protocol, effects=effects, interactions=interactions, efficiency=efficiency, report=report,
        parent_run_id=parent, reference=load_reference(), bootstrap=bootstrap, base_source=base_source,
        metric=metric, findings=findings, detectable=detectable, control=control, control_text=control_text,
        info=info.get(readout, {}),
    )
    out.mkdir(parents=True, exist_ok=True)
    report.path.write_text(markdown, encoding="utf-8")
    for note in notes:
        log.info(note)
    return report


def _note_mismatch(performance: pd.DataFrame, notes: list[str], metric: str) -> None:
    """Say so when the tested Δ (recomputed from the predictions) differs from the logged metrics' Δ."""
    if "delta_bootstrap" not in performance:
        return
    for row in performance.itertuples():
        if pd.notna(row.delta_bootstrap) and pd.notna(row.delta) and abs(row.delta_bootstrap - row.delta) > 1e-6:
            notes.append(f"{row.config}: Δ {metric} from the predictions ({row.delta_bootstrap:+.4f}) differs from "
                         f"the logged metrics' difference ({row.delta:+.4f}); the table shows the former, which its "
                         "CI and p belong to")


def _method_text(bootstrap: int, info: dict) -> str:
    volumes = f" ({info['n_volumes']} volumes × {info['n_pathologies']} pathologies)" if info else ""
    return (f"Statistics: the runs of a configuration at different seeds are its replicates. Each CI and p comes "
            f"from a two-level bootstrap ({bootstrap} resamples): seeds are drawn with replacement within each "
            f"configuration and each drawn run is re-scored on a resample of the validation volumes{volumes}, the "
            "same volume resample for every configuration (paired). Its standard error sets a Student-t interval "
            "and two-sided p with Welch–Satterthwaite degrees of freedom (few seeds make the error bar itself "
            "uncertain); p-values are Holm-adjusted within each table (configurations vs the baseline, main "
            "effects, interactions). `analysis/effects.py` states the method in full.")


def render_markdown(*, matrix: str, tracking_uri: str, out: Path, runs: pd.DataFrame, base: str,
                    performance: pd.DataFrame, protocol: str, effects: pd.DataFrame, interactions: pd.DataFrame,
                    efficiency: pd.DataFrame | None, report: Report, parent_run_id: str | None,
                    reference: dict[str, Any], bootstrap: int, base_source: str, metric: str,
                    findings: list[str], detectable: str | None, control: dict | None, control_text: str,
                    info: dict) -> str:
    """``report.md``: a failed negative control first, the findings in words, where the numbers come from, every
    table inline, links to the files and figures."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parent = f", parent run `{parent_run_id}`" if parent_run_id else ""
    title = metric_title(metric)
    n_configs = runs["config"].nunique()
    lines = [f"# Ablation report: {matrix}", ""]
    if control is not None and control.get("passed") is False:
        lines += [f"> **Warning — {control_text}**", ""]
    lines += [
        f"Generated {now} by `ctlab report --matrix {matrix} --metric {metric}` from the MLflow tracking store "
        f"`{tracking_uri}`{parent}: {n_configs} configuration(s), {len(runs)} finished run(s). Regenerating this "
        "report reads runs only; it trains nothing.", "",
        f"## Findings ({title})", "",
        *[f"- {sentence}" for sentence in findings],
        *([] if findings else ["- No component varies across the finished configurations."]),
        *([f"- {detectable}"] if detectable else []),
        f"- {control_text}", "",
        _method_text(bootstrap, info), "",
        f"Zero-shot protocol: {protocol}. Prompts \"{{pathology}} is present.\" / \"{{pathology}} is not present.\", "
        "score = softmax over the pair.", "",
        "## Performance", "",
        markdown_table(performance_display(performance, base, metric)),
        f"Baseline: **{base}** ({base_source}). Main metric: `{metric}` (choose another with `--metric`). Values: "
        "mean over seeds; brackets: 95 % CIs, cut to [0, 1] (several seeds: the two-level bootstrap where the runs' "
        "predictions are at hand, else Student's t over the seeds; one seed: the run's logged volume bootstrap). "
        + (f"Δ {title} brackets and p: two-level bootstrap, two-sided; p (Holm): adjusted over the "
           f"{max(n_configs - 1, 0)} comparisons with the baseline." if "p_value" in performance else
           f"Δ {title}: difference of the logged means (no paired test; see notes)."), "",
        f"Files: {_links(report.tables['performance'], out)}", "",
        f"### Reference: {reference['source']} — the paper's numbers, not this matrix's", "",
        f"*{reference['setting']}*", "",
        markdown_table(reference_performance_display(reference["performance"])),
        "## Per-component effects", "",
    ]
    if "effects" in report.tables:
        lines += [markdown_table(effect_display(effects, metric)),
                  f"Each row: mean over matched cells (identical in every other component and varying param) of "
                  f"{title}(value) − {title}(baseline value); MDE: the smallest |Δ| this test detects with 80 % "
                  "power at α 0.05.", "", f"Files: {_links(report.tables['effects'], out)}", ""]
    else:
        lines += ["No component varies across the finished configurations.", ""]
    if "interactions" in report.tables:
        lines += ["## Two-way interactions", "", markdown_table(interaction_display(interactions, metric)),
                  "Each row: does change A alter change B's effect? Δ(A and B) − Δ(A alone) − Δ(B alone), mean "
                  "over matched sets of four cells; 0 = the effects add up.", "",
                  f"Files: {_links(report.tables['interactions'], out)}", ""]
    lines += ["## Figures", "",
              _figure_md(out, report.figures.get("heatmap"), "per-pathology AUROC heat-map"),
              _figure_md(out, report.figures.get("metrics"), "metric bars with 95 % CIs"),
              _figure_md(out, report.figures.get("roc"), "ROC curves of the best and the baseline configuration"),
              _figure_md(out, report.figures.get("curves"),
                         "training loss and validation AUROC curves (mean over seeds)"), ""]
    if "per_pathology" in report.tables:
        lines += [f"Per-pathology AUROC values: {_links(report.tables['per_pathology'], out)}", ""]
    lines += ["## Efficiency", ""]
    if efficiency is not None:
        lines += [markdown_table(efficiency_display(efficiency)),
                  "Step (ms): the median [min–max] of the bench's repeats, each configuration timed in turn. "
                  "A speed-up whose step range overlaps the baseline's is within the machine's timing noise.", "",
                  f"Files: {_links(report.tables['efficiency'], out)}", "",
                  _figure_md(out, report.figures.get("efficiency"), "peak memory and step time")]
    else:
        lines += [f"No efficiency runs (`ctlab.kind=efficiency`) were logged for matrix `{matrix}`; "
                  "produce them with `ctlab bench model --matrix FILE`.", ""]
    seeds = runs["seed"] if "seed" in runs else pd.Series([None] * len(runs))
    lines += [f"### Reference: {reference['source']} efficiency — the paper's numbers (same GPU, same batch)", "",
              markdown_table(reference_efficiency_display(reference["efficiency"])),
              "## Runs", "",
              markdown_table(pd.DataFrame({"Configuration": runs["config"], "seed": seeds.fillna("–").astype(str),
                                           "cell id": runs["cell_id"], "run id": runs["run_id"],
                                           "started": runs["start_time"].astype(str).str[:19]}))]
    if efficiency is not None:
        lines += ["Efficiency runs:", "",
                  markdown_table(efficiency[["config", "cell_id", "run_id"]].set_axis(
                      ["Configuration", "cell id", "run id"], axis=1))]
    if report.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in report.notes], ""]
    return "\n".join(lines)
