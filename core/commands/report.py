"""``ctlab report --matrix NAME``: the paper's tables, figures and report.md from a matrix's MLflow runs, also
logged with the headline metrics to the matrix's parent run (its result page in the UI)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.stores import resolve_uri


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is; a matrix without finished runs is a clear error (status 2)."""
    from analysis.report import build_report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small CSV is only noise
    uri = args.tracking_uri or resolve_uri(None)
    out = Path(args.out) if args.out else Path("reports") / args.matrix
    report = build_report(uri, args.matrix, out, baseline=args.baseline, bootstrap=args.bootstrap,
                          metric=args.metric)
    print(f"report for matrix {args.matrix} ({len(report.run_ids)} runs from {uri}): {report.path}")
    for name, paths in report.tables.items():
        print(f"  table {name}: {', '.join(str(p) for p in paths.values())}")
    for name, path in report.figures.items():
        print(f"  figure {name}: {path}")
    for note in report.notes:
        print(f"  note: {note}")
    if report.parent_run_id is None:
        print(f"  matrix {args.matrix} has no parent run in {uri}: the report is not logged to MLflow")
    elif args.log_to_parent:
        from core.tracking import log_report

        log_report(uri, report.parent_run_id, out, report.files(), report.headline, report.headline_tags)
        print(f"  logged to parent run {report.parent_run_id}: report.md, {len(report.tables)} table(s), "
              f"{len(report.figures)} figure(s); " + ", ".join(f"{k} {v:.4g}" for k, v in report.headline.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report", help="regenerate a matrix's tables, figures and report.md from MLflow (never trains)",
        description="Read a matrix's finished runs from MLflow and write the performance, component-effect and "
                    "efficiency tables (Markdown, LaTeX, CSV), seaborn figures and report.md.",
    )
    parser.add_argument("--matrix", required=True, help="matrix name (the runs' `matrix` tag)")
    parser.add_argument("--out", help="output folder (default: reports/<matrix>)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--baseline", metavar="CELL_LABEL",
                        help='configuration that deltas and speed-ups compare against, e.g. "SA+GELU+LN, softmax" '
                             "(default: the matrix YAML's baseline, else the one closest to CT-CLIP's components)")
    parser.add_argument("--metric", default="zeroshot_auroc",
                        help="main metric of the tables, tests and findings: <readout>_<metric>, readout zeroshot "
                             "or probe, metric auroc, auprc, f1, precision, recall or accuracy (default "
                             "zeroshot_auroc; e.g. probe_auroc)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="two-level bootstrap resamples (seeds, then validation volumes) behind every CI and "
                             "p-value (default 1000)")
    parser.add_argument("--no-log", dest="log_to_parent", action="store_false",
                        help="write the files only; by default the report, tables, figures and headline metrics are "
                             "also logged to the matrix's parent run in MLflow")
    parser.set_defaults(func=run)
