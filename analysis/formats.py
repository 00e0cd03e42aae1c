"""Numeric tables → text: display strings (3 decimals, CIs in brackets), Markdown, LaTeX (booktabs) and CSV.

Markdown is written here rather than through ``DataFrame.to_markdown``,
which needs the optional ``tabulate`` package. The CSV always holds the
unrounded numbers; Markdown and LaTeX hold the display strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.tables import METRICS, effect_name
from core.naming import short_name

MISSING = "–"
METRIC_NAMES = {"auroc": "AUROC", "f1": "F1", "precision": "Precision", "recall": "Recall", "auprc": "AUPRC",
                "accuracy": "Accuracy"}
READOUT_TITLES = {"zeroshot": "Zero-shot", "probe": "Probe"}
_LATEX = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "Δ": r"$\Delta$", "×": r"$\times$", "→": r"$\rightarrow$", "–": "--", "−": "-", "±": r"$\pm$", "…": r"\ldots{}",
})


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: object, digits: int = 3, signed: bool = False) -> str:
    """``value`` to ``digits`` decimals ("+0.016" when ``signed``), "–" when missing."""
    if _missing(value):
        return MISSING
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def significant(value: object, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, whole numbers kept whole ("0.0312", "12.5", "1234")."""
    if _missing(value):
        return MISSING
    v = float(value)
    return f"{v:.0f}" if abs(v) >= 10**digits else f"{v:.{digits}g}"


def with_ci(value: object, low: object, high: object, digits: int = 3, signed: bool = False) -> str:
    """"0.604 [0.581, 0.627]" (the 95 % CI in brackets when logged)."""
    text = number(value, digits, signed)
    if _missing(low) or _missing(high) or text == MISSING:
        return text
    return f"{text} [{number(low, digits, signed)}, {number(high, digits, signed)}]"


def p_value(value: object) -> str:
    """"0.012", "<0.001" or "–"."""
    if _missing(value):
        return MISSING
    return "<0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def metric_title(metric: str) -> str:
    """"AUROC" for "auroc"; "Probe AUROC" / "Zero-shot AUROC" for a full metric key."""
    if "_" in metric and metric.split("_", 1)[0] in READOUT_TITLES:
        readout, name = metric.split("_", 1)
        return f"{READOUT_TITLES[readout]} {METRIC_NAMES.get(name, name)}"
    return METRIC_NAMES.get(metric, metric)


def _seeds(n: object) -> str:
    return MISSING if _missing(n) else str(int(n))  # type: ignore[arg-type]


def performance_display(table: pd.DataFrame, baseline: str, metric: str = "zeroshot_auroc") -> pd.DataFrame:
    """The seed paper's table, one row per configuration (seeds aggregated): Configuration, Seeds, AUROC, F1,
    Precision, Recall, AUPRC of ``metric``'s readout (mean over seeds, 95 % CI in brackets where known), the
    other readout's value of the same metric when any run logged it, then Δ ``metric`` vs the baseline (with
    the two-level CI) and its p-value, raw and Holm-adjusted, when tested."""
    readout, main = metric.split("_", 1)
    out = pd.DataFrame({"Configuration": table["config"], "Seeds": [_seeds(n) for n in table["n_seeds"]]})
    for name in dict.fromkeys((*METRICS, main)):
        out[METRIC_NAMES.get(name, name)] = [
            with_ci(v, lo, hi) for v, lo, hi in zip(table[name], table[f"{name}_ci_low"], table[f"{name}_ci_high"],
                                                    strict=True)]
    other = next(r for r in READOUT_TITLES if r != readout)
    side = f"{other}_{main}"
    if side in table and table[side].notna().any():
        out[metric_title(side)] = [with_ci(v, lo, hi) for v, lo, hi in
                                   zip(table[side], table[f"{side}_ci_low"], table[f"{side}_ci_high"], strict=True)]
    is_base = table["config"] == baseline
    has_test = "p_value" in table
    delta, low, high = table["delta"], [None] * len(table), [None] * len(table)
    if has_test:  # the test's own Δ, which its CI brackets; the logged difference where untested
        delta = table["delta_bootstrap"].fillna(table["delta"])
        low, high = table["delta_ci_low"], table["delta_ci_high"]
    out[f"Δ {METRIC_NAMES.get(main, main)}"] = ["baseline" if base else with_ci(d, lo, hi, signed=True)
                                                 for base, d, lo, hi in zip(is_base, delta, low, high, strict=True)]
    if has_test:
        out["p"] = [MISSING if base else p_value(p) for base, p in zip(is_base, table["p_value"], strict=True)]
        out["p (Holm)"] = [MISSING if base else p_value(p) for base, p in zip(is_base, table["p_adj"], strict=True)]
    return out


def effect_display(effects: pd.DataFrame, metric: str = "zeroshot_auroc") -> pd.DataFrame:
    """Axis, change ("SA → FA"), then Δ with its two-level 95 % CI, p, Holm-adjusted p, the minimal
    detectable effect and the seeds when tested; else the mean Δ and its range over the matched pairs."""
    name = METRIC_NAMES.get(metric.split("_", 1)[-1], metric)
    out = pd.DataFrame({"Axis": effects["axis"], "Change": [effect_name(row) for _, row in effects.iterrows()]})
    if "p_value" in effects:
        out[f"Δ {name} [95 % CI]"] = [with_ci(d, lo, hi, signed=True) for d, lo, hi in
                                      zip(effects["delta"], effects["ci_low"], effects["ci_high"], strict=True)]
        out["p"] = [p_value(p) for p in effects["p_value"]]
        out["p (Holm)"] = [p_value(p) for p in effects["p_adj"]]
        out["MDE (80 % power)"] = [number(m) for m in effects["mde"]]
        out["Seeds"] = [_seeds(n) for n in effects["n_seeds"]]
    else:
        out[f"Mean Δ {name}"] = [number(v, signed=True) for v in effects["mean_delta"]]
    out[f"Δ {name} range"] = [MISSING if n == 0 else f"{number(lo, signed=True)} … {number(hi, signed=True)}"
                              for lo, hi, n in zip(effects["min_delta"], effects["max_delta"], effects["n_pairs"],
                                                   strict=True)]
    out["Matched pairs"] = effects["n_pairs"].astype(int).astype(str)
    return out


def interaction_display(interactions: pd.DataFrame, metric: str = "zeroshot_auroc") -> pd.DataFrame:
    """Axes, the two changes, the difference of differences with its two-level CI, p and Holm-adjusted p when
    tested (else the logged value), and the number of matched sets of four cells."""
    name = METRIC_NAMES.get(metric.split("_", 1)[-1], metric)
    out = pd.DataFrame({
        "Axes": [f"{a} × {b}" for a, b in zip(interactions["axis_a"], interactions["axis_b"], strict=True)],
        "Change A": [f"{short_name(r.axis_a, r.baseline_a)} → {short_name(r.axis_a, r.value_a)}"
                     for r in interactions.itertuples()],
        "Change B": [f"{short_name(r.axis_b, r.baseline_b)} → {short_name(r.axis_b, r.value_b)}"
                     for r in interactions.itertuples()]})
    if "p_value" in interactions:
        out[f"Interaction Δ {name} [95 % CI]"] = [
            with_ci(d, lo, hi, signed=True)
            for d, lo, hi in zip(interactions["delta"], interactions["ci_low"], interactions["ci_high"], strict=True)]
        out["p"] = [p_value(p) for p in interactions["p_value"]]
        out["p (Holm)"] = [p_value(p) for p in interactions["p_adj"]]
    else:
        out[f"Interaction Δ {name}"] = [number(v, signed=True) for v in interactions["mean_delta"]]
    out["Matched sets"] = interactions["n_sets"].astype(int).astype(str)
    return out


def memory_unit(megabytes: pd.Series) -> tuple[str, float]:
    """("GB", 1024) when the largest peak is 10 GB or more, else ("MB", 1)."""
    return ("GB", 1024.0) if megabytes.max() >= 10 * 1024 else ("MB", 1.0)


def step_time(median: object, low: object, high: object) -> str:
    """A step time with the spread of its repeats, "90.44 [73.47–97.00]"; the median alone when the bench run
    logged no spread (runs from before it was logged)."""
    if _missing(low) or _missing(high):
        return number(median, 2)
    return f"{number(median, 2)} [{number(low, 2)}–{number(high, 2)}]"


def efficiency_display(table: pd.DataFrame) -> pd.DataFrame:
    """The seed paper's efficiency table, one row per configuration (baseline first): parameters, GFLOPs,
    peak memory with its change vs the baseline, visual-encoder forward / backward, step time with the
    min–max of its repeats (timings are noisy; a speed-up inside that spread is not a measured one), speed-up."""
    unit, scale = memory_unit(table["peak_memory_mb"])
    memory = [MISSING if _missing(m) else f"{m / scale:.2f} {unit}" + ("" if i == 0 else f" ({c:+.1f} %)")
              for i, (m, c) in enumerate(zip(table["peak_memory_mb"], table["memory_change_pct"], strict=True))]
    return pd.DataFrame({
        "Configuration": table["config"],
        "Params (M)": [number(v / 1e6, 2) for v in table["params_total"]],
        "Trainable (M)": [number(v / 1e6, 2) for v in table["params_trainable"]],
        "GFLOPs": [significant(v) for v in table["gflops"]],  # a tiny CPU model does 0.03, a paper's 100s
        "Peak memory": memory,
        "Visual fwd (ms)": [number(v, 2) for v in table["visual_fwd_ms"]],
        "Visual bwd (ms)": [number(v, 2) for v in table["visual_bwd_ms"]],
        "Step (ms)": [step_time(*row) for row in zip(table["step_ms"], table["step_ms_min"], table["step_ms_max"],
                                                     strict=True)],
        "Speed-up": [MISSING if _missing(s) else f"{s:.2f}×" for s in table["step_speedup"]],
    })


def reference_performance_display(rows: list[Mapping[str, object]]) -> pd.DataFrame:
    """The paper's performance rows (from ``analysis/reference.yaml``) in the performance table's columns."""
    return pd.DataFrame([{"Configuration": row["config"], **{METRIC_NAMES[m]: number(row.get(m)) for m in METRICS}}
                         for row in rows])


def reference_efficiency_display(rows: list[Mapping[str, object]]) -> pd.DataFrame:
    """The paper's efficiency rows, with memory change and speed-up against its first row."""
    base = rows[0]
    out = []
    for i, row in enumerate(rows):
        change = "" if i == 0 else f" ({(row['peak_memory_gb'] / base['peak_memory_gb'] - 1) * 100:+.1f} %)"
        out.append({"Configuration": row["config"], "Peak memory": f"{row['peak_memory_gb']:.2f} GB{change}",
                    "Visual fwd (ms)": number(row["visual_fwd_ms"], 2),
                    "Visual bwd (ms)": number(row["visual_bwd_ms"], 2), "Step (ms)": number(row["step_ms"], 2),
                    "Speed-up": f"{base['step_ms'] / row['step_ms']:.2f}×"})
    return pd.DataFrame(out)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s cells (numeric columns right-aligned, text left)."""
    def cell(value: object) -> str:
        return str(value).replace("|", r"\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    numeric = [frame[c].astype(str).str.match(r"[-+]?\d").any() for c in frame.columns[1:]]
    rule = "|" + "|".join([":---"] + ["---:" if n else ":---" for n in numeric]) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def latex_escape(text: object) -> str:
    """``text`` safe in LaTeX text mode: & % $ # _ { } ~ ^ \\ < > escaped, Δ × → – − ± as math or dashes."""
    return str(text).translate(_LATEX)


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` of ``frame``'s cells with an escaped caption and ``\\label{tab:<label>}``."""
    key = re.sub(r"[^A-Za-z0-9:-]+", "-", label).strip("-")
    columns = "l" + "r" * (len(frame.columns) - 1)
    header = " & ".join(latex_escape(c) for c in frame.columns) + r" \\"
    body = [" & ".join(latex_escape(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    return "\n".join([
        r"\begin{table}[htbp]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{tab:{key}}}", rf"\begin{{tabular}}{{{columns}}}", r"\toprule", header, r"\midrule", *body,
        r"\bottomrule", r"\end{tabular}", r"\end{table}",
    ]) + "\n"


def write_table(numbers: pd.DataFrame, display: pd.DataFrame, folder: Path, stem: str, caption: str,
                index: bool = False) -> dict[str, Path]:
    """Write ``<stem>.csv`` (the unrounded ``numbers``), ``<stem>.md`` and ``<stem>.tex`` (``display``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / f"{stem}.csv", "md": folder / f"{stem}.md", "tex": folder / f"{stem}.tex"}
    numbers.to_csv(paths["csv"], index=index)
    paths["md"].write_text(f"{caption}\n\n{markdown_table(display)}", encoding="utf-8")
    paths["tex"].write_text(latex_table(display, caption, stem), encoding="utf-8")
    return paths

