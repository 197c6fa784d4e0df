#!/usr/bin/env python
"""The mutation score of the modules that guard users' files and runs (`make mutation`).

mutmut (pinned in requirements.txt) changes one thing at a time in these modules (an operator, a
constant, a comparison, a call's argument...) and runs the tests that reach the changed
function; a mutant is *killed* when one of them fails. A mutant no test reaches ("no tests")
counts as a survivor. Survivors that behave exactly as the original (equivalent mutants) are
listed, each with the reason, in docs/reliability.md ("Mutants judged equivalent"): they are left
out of the score. Goal: at least 90% of the other mutants killed over all modules, 85% in each.

mutmut imports the mutated code from `./`, `src/` or `source/` of the folder it runs in, so the
run happens in a copy of the repository (``--work``, default output/mutation) with the package at
``src/maskd``. The tests are the fast (not ``slow``) in-process tests of the guard concerns, in a
fixed order; end-to-end tests run the package in subprocesses and could not see a mutant anyway.

    python tools/mutation.py [--modules maskd.utils.files ...] [--max-children 2]
    python tools/mutation.py --report-only   # the figures of the last run in --work

Exit status: 0 when the goals are met, 1 when a module or the total falls short (the figures
are printed either way), 2 when mutmut did not finish.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join("projects", "MasKD", "maskd")

# the modules that read users' files and guard runs, and the fast tests of their concerns
MODULES = (
    "maskd.checkpoint.safe_pickle",
    "maskd.checkpoint.provenance",
    "maskd.checkpoint.loading",
    "maskd.config.loading",
    "maskd.data.datasets",
    "maskd.utils.files",
    "maskd._compat",
)
TESTS = (
    "tests/test_guards.py",
    "tests/test_bad_inputs.py",
    "tests/test_trust.py",
    "tests/test_reliability.py",
    "tests/test_configs.py",
    "tests/test_train_net.py",
)
# what the tests read beside the package (configs, docs they check, the entry points)
ALSO_COPY = ("configs", "docs", "demo", "tools", "train_net.py", "distill_net.py", "README.md")
GOAL_TOTAL, GOAL_MODULE = 0.90, 0.85
EQUIVALENT_HEADING = "## Mutants judged equivalent"
STATUSES = ("killed", "timeout", "survived", "no tests", "suspicious", "segfault", "not checked")


def module_file(module: str) -> str:
    """``maskd.utils.files`` -> ``src/maskd/utils/files.py`` (in the work copy)."""
    return os.path.join("src", *module.split(".")) + ".py"


def tracked_files(root: str) -> List[str]:
    """The repository's files as git knows them (the tree a clone has)."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p]


def stage(root: str, work: str, modules: Iterable[str], tests: Iterable[str]) -> None:
    """A fresh copy of the repository in ``work`` with the package at ``src/maskd`` and
    mutmut's settings in its pyproject.toml."""
    if os.path.exists(work):
        shutil.rmtree(work)
    package = PACKAGE + os.sep
    for rel in tracked_files(root):
        src = os.path.join(root, rel)
        dst = os.path.join(work, "src", rel[len("projects/MasKD/") :])
        if not rel.startswith(package):
            dst = os.path.join(work, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):  # maskd/model_zoo/configs -> the top-level configs/
            target = os.path.relpath(os.path.join(work, "configs"), os.path.dirname(dst))
            os.symlink(target, dst)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)
    settings = {
        "source_paths": ["src/maskd"],
        "only_mutate": [module_file(m) for m in modules],
        "pytest_add_cli_args": ["-p", "no:randomly", "-p", "no:cacheprovider", "-q"],
        "pytest_add_cli_args_test_selection": ["-m", "not slow", *tests],
        "also_copy": list(ALSO_COPY),
        # torch is not fork-safe once its thread pools run: fork each mutant from a server
        "process_isolation": "forkserver",  # that has only imported the tests
        "use_git_change_detection": False,
    }
    with open(os.path.join(work, "pyproject.toml"), "a") as f:
        f.write("\n[tool.mutmut]\n")
        for key, value in settings.items():  # JSON's strings, lists and booleans are TOML's
            f.write(f"{key} = {json.dumps(value)}\n")


def _pairs(text: str, pattern: str) -> Dict[str, str]:
    """{first group: second group} of the lines of ``text`` that match ``pattern``."""
    return dict(m.groups() for m in map(re.compile(pattern).match, text.splitlines()) if m)


def parse_results(text: str) -> Dict[str, str]:
    """``mutmut results --all true`` -> {mutant name: status}."""
    return _pairs(text, r"^\s*(\S+__mutmut_\d+): (.+?)\s*$")


def parse_equivalent(markdown: str) -> Dict[str, str]:
    """The table under "Mutants judged equivalent": {mutant name: reason}."""
    if EQUIVALENT_HEADING not in markdown:
        return {}
    section = markdown.split(EQUIVALENT_HEADING, 1)[1].split("\n## ", 1)[0]
    return _pairs(section, r"^\|\s*`([^`]+__mutmut_\d+)`\s*\|\s*(.+?)\s*\|\s*$")


def module_of(mutant: str, modules: Iterable[str]) -> Optional[str]:
    """The module a mutant name belongs to (``maskd.utils.files.x_open_regular__mutmut_3``)."""
    best = None
    for module in modules:
        if mutant.startswith(module + ".") and (best is None or len(module) > len(best)):
            best = module
    return best


def summarise(
    results: Dict[str, str], equivalent: Dict[str, str], modules: Iterable[str]
) -> Tuple[List[dict], dict]:
    """Per module and in total: the counts of each status, the equivalent survivors and the
    score, killed / (mutants - equivalent); a timeout counts as killed (the tests stopped it),
    a mutant no test reaches as a survivor."""
    modules = list(modules)
    counts = {m: Counter() for m in modules}
    for name, status in results.items():
        module = module_of(name, modules)
        if module is None:
            continue
        if status in ("survived", "no tests") and name in equivalent:
            status = "equivalent"
        counts[module][status] += 1
    rows = []
    total = Counter()
    for module in modules:
        c = counts[module]
        total.update(c)
        rows.append(_row(module, c))
    return rows, _row("total", total)


def _row(name: str, c: Counter) -> dict:
    mutants = sum(c.values())
    killed = c["killed"] + c["timeout"]
    judged = mutants - c["equivalent"]
    return {
        "module": name,
        "mutants": mutants,
        "killed": killed,
        "survived": c["survived"],
        "no tests": c["no tests"],
        "equivalent": c["equivalent"],
        "other": mutants - killed - c["survived"] - c["no tests"] - c["equivalent"],
        "score": killed / judged if judged else float("nan"),
    }


def table(rows: List[dict], total: dict) -> str:
    head = ["module", "mutants", "killed", "survived", "no tests", "equivalent", "other", "score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows + [total]:
        cells = [str(r[k]) for k in head[:-1]] + [f"{100 * r['score']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_met(rows: List[dict], total: dict) -> List[str]:
    """What falls short of the goals (empty when they are met)."""
    short = [
        f"{r['module']}: {100 * r['score']:.1f}% < {100 * GOAL_MODULE:.0f}%"
        for r in rows
        if r["mutants"] and not r["score"] >= GOAL_MODULE
    ]
    if not total["score"] >= GOAL_TOTAL:
        short.append(f"total: {100 * total['score']:.1f}% < {100 * GOAL_TOTAL:.0f}%")
    return short


def mutmut(work: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=work,
        env=env,
        check=check,
        capture_output=args[0] == "results",
        text=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--work", default=os.path.join(ROOT, "output", "mutation"))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report-only", action="store_true", help="no run: the last figures")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if not args.report_only:
        stage(ROOT, args.work, args.modules, TESTS)
        run = mutmut(args.work, "run", "--max-children", str(args.max_children), check=False)
        if run.returncode != 0:
            print(f"[mutation] mutmut run ended with status {run.returncode}", file=sys.stderr)
            return 2
    elif not os.path.isdir(os.path.join(args.work, "mutants")):
        print(f"[mutation] no run in {args.work}: run without --report-only", file=sys.stderr)
        return 2
    results = parse_results(mutmut(args.work, "results", "--all", "true").stdout)
    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        equivalent = parse_equivalent(f.read())
    stale = sorted(n for n in equivalent if n not in results and module_of(n, args.modules))
    rows, total = summarise(results, equivalent, args.modules)
    print(table(rows, total))
    if stale:
        print("[mutation] listed as equivalent but not a mutant of this run (the code changed):")
        print("\n".join("  " + n for n in stale))
    survivors = sorted(
        n
        for n, s in results.items()
        if s in ("survived", "no tests") and n not in equivalent and module_of(n, args.modules)
    )
    if survivors:
        print(f"[mutation] {len(survivors)} survivors (`mutmut show NAME` in {args.work}):")
        print("\n".join(f"  {n}: {results[n]}" for n in survivors))
    if not args.report_only:
        print(f"[mutation] {time.perf_counter() - start:.0f} s, {args.max_children} processes")
    short = goals_met(rows, total)
    if total["other"]:
        print(
            f"[mutation] {total['other']} mutants neither killed nor survived (not checked, "
            "suspicious, segfault): see `mutmut results --all true`"
        )
    if short:
        print("[mutation] short of the goals: " + "; ".join(short))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
