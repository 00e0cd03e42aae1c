"""Mutation testing of the modules whose silent failure would corrupt results; writes reports/mutation.md.

Each module is mutated by mutmut against the fast tests that check it, in a scratch copy of the
repository (mutmut rewrites the sources it mutates), one module at a time, so a run can be limited to
the modules named on the command line and each mutant runs only the tests that reach it. Results of
modules not run this time are kept from the previous report. A surviving mutant is either killed by a
new test or listed in .ci/mutation-equivalent.yaml with the reason it cannot change a result.

    python .ci/mutate.py [MODULE ...] [--max-children N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "mutation.md"
EQUIVALENT = ROOT / ".ci" / "mutation-equivalent.yaml"
SOURCES = ("core", "experiments", "analysis")
FAST = "not slow and not postgres"

# module -> the fast tests that check it (mutmut runs, per mutant, only those that reach the mutated function)
MODULES: dict[str, list[str]] = {
    "core/metrics.py": ["tests/test_metrics.py"],
    "core/losses.py": ["tests/test_losses.py", "tests/test_distributed.py"],
    "experiments/launcher.py": ["tests/test_cell_sampler.py", "tests/test_matrix_expand.py"],
    "core/encoders/base.py": ["tests/test_axes.py", "tests/test_encoders.py"],
    "core/layers/attention.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/layers/norm.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/layers/mlp.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/layers/block.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/data/preprocess.py": ["tests/test_data_preprocess.py"],
}
KILLED = ("killed", "timeout", "segfault", "caught by type check")


def run_module(module: str, max_children: int, verbose: bool = False) -> dict:
    """Mutate ``module`` in a scratch copy against its tests; returns counts and the surviving mutants' diffs."""
    with tempfile.TemporaryDirectory(prefix="ctlab-mutate-") as scratch:
        work = Path(scratch)
        for name in (*SOURCES, "tests"):
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        pyproject = (ROOT / "pyproject.toml").read_text()
        settings = {"source_paths": list(SOURCES), "only_mutate": [module],
                    "pytest_add_cli_args_test_selection": [*MODULES[module], "-m", FAST],
                    "process_isolation": "forkserver", "use_git_change_detection": False}
        (work / "pyproject.toml").write_text(pyproject + "\n[tool.mutmut]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # tests must import the mutants
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        mutmut = [sys.executable, "-m", "mutmut"]
        log = Path(tempfile.gettempdir()) / f"ctlab-mutation-{module.replace('/', '.')}.log"
        with open(os.devnull if not verbose else log, "w") as sink:
            subprocess.run([*mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, check=True,
                           stdout=sink)
        listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env, check=True,
                                 capture_output=True, text=True).stdout
        statuses = dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.M))
        survivors = {}
        for name, status in statuses.items():
            if status not in KILLED:
                diff = subprocess.run([*mutmut, "show", name], cwd=work, env=env, capture_output=True,
                                      text=True).stdout
                survivors[name] = {"status": status, "diff": "\n".join(diff.splitlines()[1:]).strip()}
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return {"tests": MODULES[module], "counts": counts, "survivors": survivors}


def score(result: dict) -> str:
    total = sum(result["counts"].values())
    killed = sum(result["counts"].get(s, 0) for s in KILLED)
    return f"{100 * killed / total:.1f} %" if total else "–"


def write_report(results: dict[str, dict]) -> None:
    """reports/mutation.md: the score per module, then every surviving mutant with its reason."""
    reasons = yaml.safe_load(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    lines = ["# Mutation testing", "",
             "`make mutate` (mutmut) mutates each module below against the fast tests named beside it. "
             "Score = killed (incl. timeouts) / mutants. Every survivor is listed with why it cannot change "
             "a result (an equivalent mutant) or, when it could, is killed by a test and no longer listed.", "",
             "| module | tests | mutants | killed | survived | other | score |", "|---|---|---|---|---|---|---|"]
    for module in MODULES:
        if module not in results:
            lines.append(f"| `{module}` | {', '.join(MODULES[module])} | not run | | | | |")
            continue
        r = results[module]
        total = sum(r["counts"].values())
        killed = sum(r["counts"].get(s, 0) for s in KILLED)
        survived = r["counts"].get("survived", 0)
        lines.append(f"| `{module}` | {', '.join(r['tests'])} | {total} | {killed} | {survived} | "
                     f"{total - killed - survived} | {score(r)} |")
    unexplained = []
    for module, r in results.items():
        if not r["survivors"]:
            continue
        lines += ["", f"## Survivors in `{module}`", ""]
        for name, mutant in sorted(r["survivors"].items()):
            reason = reasons.get(name)
            if reason is None:
                unexplained.append(name)
            lines += [f"### `{name}` ({mutant['status']})", "", f"Reason: {reason or 'UNEXPLAINED'}", "",
                      "```diff", mutant["diff"], "```", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines).rstrip() + "\n")
    (REPORT.with_suffix(".json")).write_text(json.dumps(results, indent=1, sort_keys=True))
    if unexplained:
        print(f"{len(unexplained)} surviving mutant(s) without a reason in {EQUIVALENT.name}: "
              + ", ".join(unexplained))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--log", action="store_true", help="keep mutmut progress in $TMPDIR/ctlab-mutation-*.log")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    previous = REPORT.with_suffix(".json")
    for module in args.modules or list(MODULES):
        print(f"mutating {module} against {' '.join(MODULES[module])} ...", flush=True)
        result = run_module(module, args.max_children, args.log)
        results = json.loads(previous.read_text()) if previous.exists() else {}  # other modules: as last run
        results[module] = result
        print(f"  {score(result)} killed; {len(result['survivors'])} survivor(s)", flush=True)
        write_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
