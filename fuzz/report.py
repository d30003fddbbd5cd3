"""The table of a fuzzing run: per target the executions and time (from run.py's stats), the corpus size, the line
coverage its corpus reaches in the target's modules (the corpus replayed under coverage.py, in a fresh interpreter
so that import-time lines count), and the crash inputs found and still open (replayed against the current code).

    python fuzz/report.py [--work DIR] [--stats FILE ...] [TARGET ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
sys.path.insert(0, str(ROOT))
from fuzz.run import TARGETS  # noqa: E402

# Runs in a fresh interpreter: coverage starts before minisd is imported.
REPLAY = r"""
import json, sys
from pathlib import Path
import coverage
name, work = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, {root!r})
cov = coverage.Coverage(data_file=None, include=[{root!r} + "/minisd/*"])
cov.start()
import importlib
from fuzz import harness
target = importlib.import_module(f"fuzz.fuzz_{{name}}").TARGET
inputs = harness.corpus_inputs(target) + sorted((work / name / "corpus").glob("*"))
crashes = sorted(p for p in (work / name / "crashes").glob("*") if p.suffix != ".txt" and not p.name.startswith("slow"))
open_crashes = []
for path in inputs:
    harness.check_input(target, path.read_bytes())
for path in crashes:
    try:
        harness.check_input(target, path.read_bytes())
    except harness.InvariantViolation as e:
        open_crashes.append(f"{{path.name}}: {{str(e).splitlines()[0]}}")
cov.stop()
modules = {{}}
for module in target.modules:
    _, statements, _, missing, _ = cov.analysis2({root!r} + "/" + module)
    modules[module] = [len(statements) - len(missing), len(statements)]
print(json.dumps({{"corpus": len(inputs), "crash_inputs": len(crashes), "open": open_crashes, "modules": modules}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET")
    parser.add_argument("--work", type=Path, default=Path("fuzz-work"))
    parser.add_argument("--stats", type=Path, action="append",
                        help="a stats file (default: WORK/stats.jsonl); repeatable")
    args = parser.parse_args()
    totals = defaultdict(lambda: {"executions": 0, "seconds": 0.0})
    for stats in args.stats or [args.work / "stats.jsonl"]:
        if stats.exists():
            for line in stats.read_text().splitlines():
                record = json.loads(line)
                totals[record["target"]]["executions"] += record["executions"]
                totals[record["target"]]["seconds"] += record["seconds"]
    print("| target | executions | time (s) | corpus | line coverage of the target's modules | crash inputs | open |")
    print("|---|---:|---:|---:|---|---:|---:|")
    still_open = 0
    for name in args.targets or TARGETS:
        result = subprocess.run([sys.executable, "-c", REPLAY.format(root=str(ROOT)), name, str(args.work)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"| {name} | replay failed: {result.stderr.strip().splitlines()[-1]} |")
            still_open += 1
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        coverage = ", ".join(f"{Path(m).name} {c}/{n} ({100 * c / max(n, 1):.0f}%)"
                             for m, (c, n) in r["modules"].items())
        t = totals[name]
        print(f"| {name} | {t['executions']} | {t['seconds']:.0f} | {r['corpus']} | {coverage} | "
              f"{r['crash_inputs']} | {len(r['open'])} |")
        for line in r["open"]:
            print(f"    open: {line}")
        still_open += len(r["open"])
    return 1 if still_open else 0


if __name__ == "__main__":
    sys.exit(main())
