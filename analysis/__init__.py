"""Analysis: a matrix's MLflow runs → pandas → the paper's tables (md, tex, csv), seaborn figures and report.md.

``load_runs`` is the one reader every table uses; ``build_report`` writes a
whole report (``ctlab report --matrix NAME``). Nothing here trains.
"""

from analysis.report import Report, build_report
from analysis.runs import NoRunsError, artifact_frame, load_runs, metric_history

__all__ = ["NoRunsError", "Report", "artifact_frame", "build_report", "load_runs", "metric_history"]
