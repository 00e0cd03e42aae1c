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
import signal
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
# per-test limit (pytest-timeout) in mutation runs: a mutant that makes a test wait forever (a worker polling
# for a cell that never finishes) fails in this many seconds instead of running into mutmut's limit of
# 15 x the whole selection's duration; the slowest fast test of these modules takes 7 s
PER_TEST_TIMEOUT = ["--timeout", "60"]

# module -> the fast tests that check it (mutmut runs, per mutant, only those that reach the mutated function)
MODULES: dict[str, list[str]] = {
    "core/metrics.py": ["tests/test_metrics.py"],
    "core/losses.py": ["tests/test_losses.py", "tests/test_distributed.py"],
    "experiments/launcher.py": ["tests/test_launcher.py", "tests/test_cell_sampler.py", "tests/test_matrix_expand.py"],
    "core/encoders/base.py": ["tests/test_axes.py", "tests/test_encoders.py"],
    "core/layers/attention.py": ["tests/test_layers.py", "tests/test_axes.py", "tests/test_performance.py"],
    "core/layers/norm.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/layers/mlp.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/layers/block.py": ["tests/test_layers.py", "tests/test_axes.py"],
    "core/data/preprocess.py": ["tests/test_data_preprocess.py", "tests/test_data_bad_input.py"],
}
# module -> a pytest -k expression narrowing its tests: the layers are reached by every encoder's axis cases,
# and the two larger DCFormers (6 s per case) check nothing about a layer that dcformer_nano does not.
# Of tests/test_performance.py the attention layer needs the sdpa-backend tests only.
KEYWORDS: dict[str, str] = {
    module: "not dcformer_naive and not dcformer_tiny"
    for module in ("core/encoders/base.py", "core/layers/norm.py", "core/layers/mlp.py", "core/layers/block.py")
}
# TransformerBlock is built by vit3d and hybrid only.
KEYWORDS["core/layers/block.py"] = "test_layers or vit3d or hybrid"
KEYWORDS["core/layers/attention.py"] = "not dcformer_naive and not dcformer_tiny and (not test_performance or sdpa)"
# "killed by a later test": a survivor of the recorded run that a test added afterwards kills, checked by
# running that test with the mutant switched on (MUTANT_UNDER_TEST) instead of a whole new run.
KILLED = ("killed", "timeout", "segfault", "caught by type check", "killed by a later test")
MUTMUT = [sys.executable, "-m", "mutmut"]


def run_module(module: str, max_children: int, verbose: bool = False, minutes: float | None = None,
               mutants: list[str] | None = None, tests: list[str] | None = None) -> dict:
    """Mutate ``module`` in a scratch copy against its tests; returns counts and the surviving mutants' diffs.

    With ``minutes``, mutmut is stopped after that long and the mutants it had not reached count as
    ``not checked``. With ``mutants``, only those (by name) are run; with ``tests``, against those test files
    instead of the module's selection.
    """
    with tempfile.TemporaryDirectory(prefix="ctlab-mutate-") as scratch:
        work = Path(scratch)
        for name in (*SOURCES, "tests"):
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        pyproject = (ROOT / "pyproject.toml").read_text()
        settings = {"source_paths": list(SOURCES), "only_mutate": [module],
                    "pytest_add_cli_args_test_selection": [*tests, "-m", FAST] if tests else
                    [*MODULES[module], "-m", FAST, *_keyword(module)],
                    "pytest_add_cli_args": PER_TEST_TIMEOUT,  # the selection's arguments are not passed per mutant
                    "process_isolation": "forkserver", "use_git_change_detection": False}
        (work / "pyproject.toml").write_text(pyproject + "\n[tool.mutmut]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in settings.items()))
        log = Path(tempfile.gettempdir()) / f"ctlab-mutation-{module.replace('/', '.')}.log"
        with open(log if verbose else os.devnull, "w") as sink:
            proc = subprocess.Popen([*MUTMUT, "run", "--max-children", str(max_children), *(mutants or [])],
                                    cwd=work, env=_env(),
                                    stdout=sink, start_new_session=True)
            try:
                proc.wait(timeout=60 * minutes if minutes else None)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # mutmut and its workers
                proc.wait()
        return collect(work, module)


def rerun_survivors(module: str, args: argparse.Namespace, last: dict) -> dict:
    """Run last time's survivors that have no reason in the equivalents file, and the mutants its time budget
    left unchecked, again; merge: mutants killed last time stay killed, explained survivors stay as recorded."""
    explained = set(yaml.safe_load(EQUIVALENT.read_text()) or {}) if EQUIVALENT.exists() else set()
    unchecked_before = [] if args.no_unchecked else last.get("unchecked", [])
    again = sorted([*(name for name in last["survivors"] if name not in explained), *unchecked_before])
    rerun = run_module(module, args.max_children, args.log, args.minutes, mutants=again, tests=args.tests)
    counts = dict(last["counts"])
    for name, mutant in last["survivors"].items():
        if name in again:
            counts[mutant["status"]] -= 1
    counts["not checked"] = counts.get("not checked", 0) - len(unchecked_before)
    statuses = {name: "not checked" if name in rerun["unchecked"] else
                rerun["survivors"].get(name, {}).get("status", "killed") for name in again}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = {name: mutant for name, mutant in last["survivors"].items() if name not in again}
    survivors.update({name: rerun["survivors"][name] for name, status in statuses.items()
                      if status not in KILLED and status != "not checked"})
    unchecked = [name for name, status in statuses.items() if status == "not checked"]
    unchecked += [name for name in last.get("unchecked", []) if name not in unchecked_before]
    result = {"tests": MODULES[module], "counts": {k: v for k, v in counts.items() if v}, "survivors": survivors,
              "unchecked": unchecked}
    if args.tests:  # survivors of the full selection, rerun against the files holding the tests added since
        result["rerun_tests"] = sorted({*last.get("rerun_tests", []), *args.tests})
    return result


def _keyword(module: str) -> list[str]:
    return ["-k", KEYWORDS[module]] if module in KEYWORDS else []


def tests_label(module: str) -> str:
    """The module's tests as the report shows them (with the -k narrowing, if any)."""
    return ", ".join(MODULES[module]) + (f" (-k '{KEYWORDS[module]}')" if module in KEYWORDS else "")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # tests must import the mutants
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def collect(work: Path, module: str) -> dict:
    """Counts per status and the diff of every mutant not killed, from a mutmut run in ``work``."""
    listing = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=work, env=_env(), check=True,
                             capture_output=True, text=True).stdout
    statuses = dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.M))
    survivors = {}
    for name, status in statuses.items():
        if status not in KILLED and status != "not checked":
            diff = subprocess.run([*MUTMUT, "show", name], cwd=work, env=_env(), capture_output=True,
                                  text=True).stdout
            survivors[name] = {"status": status, "diff": "\n".join(diff.splitlines()[1:]).strip()}
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    unchecked = sorted(name for name, status in statuses.items() if status == "not checked")
    return {"tests": MODULES[module], "counts": counts, "survivors": survivors, "unchecked": unchecked}


def score(result: dict) -> str:
    total = sum(n for s, n in result["counts"].items() if s != "not checked")
    killed = sum(result["counts"].get(s, 0) for s in KILLED)
    return f"{100 * killed / total:.1f} %" if total else "–"


def write_report(results: dict[str, dict]) -> None:
    """reports/mutation.md: the score per module, then every surviving mutant with its reason."""
    reasons = yaml.safe_load(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    lines = ["# Mutation testing", "",
             "`make mutate` (mutmut) mutates each module below against the fast tests named beside it. "
             f"Score = killed (incl. timeouts: a test past {PER_TEST_TIMEOUT[1]} s, pytest-timeout, fails) / "
             "mutants checked; a run stopped by its time budget "
             "(`--minutes`) leaves the rest `not checked`; `killed by a later test` counts survivors of the "
             "recorded run that a test added afterwards kills (run with the mutant switched on); "
             "`--survivors` reruns only last time's unexplained survivors and unchecked mutants through mutmut "
             "(with `--tests`, against the files holding the tests added since, named in the table). "
             "Every survivor is listed with why it cannot change "
             "a result (an equivalent mutant) or, when it could, is killed by a test and no longer listed.", "",
             "| module | tests | mutants | checked | killed | survived | other | score |",
             "|---|---|---|---|---|---|---|---|"]
    for module in MODULES:
        if module not in results:
            lines.append(f"| `{module}` | {tests_label(module)} | not run | | | | | |")
            continue
        r = results[module]
        total = sum(r["counts"].values())
        checked = total - r["counts"].get("not checked", 0)
        killed = sum(r["counts"].get(s, 0) for s in KILLED)
        survived = r["counts"].get("survived", 0)
        label = tests_label(module) + (f"; survivors rerun against {', '.join(r['rerun_tests'])}"
                                       if r.get("rerun_tests") else "")
        lines.append(f"| `{module}` | {label} | {total} | {checked} | {killed} | {survived} | "
                     f"{checked - killed - survived} | {score(r)} |")
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
    parser.add_argument("--minutes", type=float, help="stop each module's run after this long")
    parser.add_argument("--collect", type=Path, metavar="DIR",
                        help="only read the results of a mutmut run left in DIR (one MODULE)")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the mutants that survived without a reason or were not checked last time "
                             "(the module unchanged, tests added)")
    parser.add_argument("--no-unchecked", action="store_true",
                        help="with --survivors: leave the mutants not checked last time unchecked")
    parser.add_argument("--tests", nargs="+", metavar="FILE",
                        help="with --survivors: run them against these test files only (where the new tests are)")
    parser.add_argument("--log", action="store_true", help="keep mutmut progress in $TMPDIR/ctlab-mutation-*.log")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    previous = REPORT.with_suffix(".json")
    for module in args.modules or list(MODULES):
        print(f"mutating {module} against {' '.join(MODULES[module])} ...", flush=True)
        if args.collect:
            result = collect(args.collect, module)
        elif args.survivors:
            result = rerun_survivors(module, args, json.loads(previous.read_text())[module])
        else:
            result = run_module(module, args.max_children, args.log, args.minutes)
        results = json.loads(previous.read_text()) if previous.exists() else {}  # other modules: as last run
        results[module] = result
        print(f"  {score(result)} killed; {len(result['survivors'])} survivor(s)", flush=True)
        write_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
