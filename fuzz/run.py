"""Run fuzz targets for a given time each (`make fuzz`, FUZZ_SECONDS): libFuzzer in segments, so that a fix made
meanwhile is picked up by the next segment and a hang or native crash costs one segment, not the run.

    python fuzz/run.py --seconds 60 [--work DIR] [--stats FILE] [TARGET ...]
    python fuzz/run.py --merge [--work DIR] [TARGET ...]     # keep what a run found in fuzz/corpus/

New corpus entries go to WORK/<target>/corpus (the committed corpus in fuzz/corpus/ is read, never written);
violations (kept going past, see harness.main) and libFuzzer's crash/timeout/oom artifacts to WORK/<target>/crashes.
Each segment appends one JSON line to the stats file: executions, seconds, corpus size, crashes so far.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
TARGETS = ["safetensors", "pickle", "diffusers_config", "infotext", "prompt", "png_metadata", "image", "lora"]


def run_target(name: str, seconds: float, work: Path, stats: Path, segment: float, timeout: int) -> dict:
    corpus, crashes = work / name / "corpus", work / name / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    total = {"target": name, "executions": 0, "seconds": 0.0, "segments": 0}
    deadline = time.monotonic() + seconds
    env = dict(os.environ, MINISD_FUZZ_KEEP_GOING=str(crashes))
    while (left := deadline - time.monotonic()) > 5:
        chunk = int(min(segment, left))
        command = [sys.executable, str(FUZZ_DIR / f"fuzz_{name}.py"), f"-max_total_time={chunk}",
                   f"-timeout={timeout}", "-rss_limit_mb=4096", "-print_final_stats=1",
                   f"-artifact_prefix={crashes}/", str(corpus), str(FUZZ_DIR / "corpus" / name)]
        start = time.monotonic()
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=chunk + 300)
        except subprocess.TimeoutExpired as e:  # hung past libFuzzer's own -timeout: note it, go on
            result = subprocess.CompletedProcess(command, "hang", e.stdout or "", e.stderr or "")
            result.stdout, result.stderr = [x.decode(errors="replace") if isinstance(x, bytes) else x
                                            for x in (result.stdout, result.stderr)]
        log = result.stdout + result.stderr
        executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"#(\d+)\s", log)
        record = {"target": name, "rc": result.returncode, "executions": int(executed[-1]) if executed else 0,
                  "seconds": round(time.monotonic() - start, 1), "corpus": len(list(corpus.iterdir())),
                  "violations": sorted({line for line in log.splitlines() if line.startswith("== violation")}),
                  "crash_files": len(list(crashes.glob("crash-*"))) + len(list(crashes.glob("timeout-*")))
                  + len(list(crashes.glob("oom-*"))), "time": time.strftime("%H:%M:%S")}
        if result.returncode != 0:
            (work / name / f"segment-{total['segments']}.log").write_text(log[-20000:])
        total["executions"] += record["executions"]
        total["seconds"] += record["seconds"]
        total["segments"] += 1
        with open(stats, "a") as f:
            f.write(json.dumps(record) + "\n")
    return total


def merge(name: str, work: Path, max_bytes: int = 200_000) -> int:
    """Keep what fuzzing found: the inputs of WORK/<name>/corpus that add coverage beyond the committed corpus
    (libFuzzer's -merge=1) go to fuzz/corpus/<name>/fuzzed, where `make test` replays them. Returns their count."""
    import hashlib
    import shutil
    import tempfile

    committed = FUZZ_DIR / "corpus" / name
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        known = set()
        for path in committed.rglob("*"):
            if path.is_file():
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                known.add(digest)
                shutil.copy(path, base / digest)
        subprocess.run([sys.executable, str(FUZZ_DIR / f"fuzz_{name}.py"), "-merge=1", "-timeout=120",
                        "-rss_limit_mb=4096", str(base), str(work / name / "corpus")],
                       capture_output=True, text=True, check=True)
        out = committed / "fuzzed"
        out.mkdir(exist_ok=True)
        added = 0
        for path in base.iterdir():
            if path.name not in known and path.stat().st_size <= max_bytes:
                shutil.copy(path, out / path.name)
                added += 1
    return added


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--segment", type=float, default=600, help="seconds per libFuzzer run")
    parser.add_argument("--timeout", type=int, default=120,
                        help="libFuzzer's per-input wall-clock timeout, a backstop for hangs in native code "
                             "(the harness bounds CPU time per input itself)")
    parser.add_argument("--work", type=Path, default=Path("fuzz-work"))
    parser.add_argument("--stats", type=Path)
    parser.add_argument("--merge", action="store_true", help="do not fuzz: add what WORK's corpora cover beyond "
                        "the committed corpus to fuzz/corpus/<target>/fuzzed")
    args = parser.parse_args()
    unknown = [name for name in args.targets if not (FUZZ_DIR / f"fuzz_{name}.py").exists()]
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; the default set is {', '.join(TARGETS)}")
    if args.merge:
        for name in args.targets or TARGETS:
            print(f"{name:17} {merge(name, args.work)} inputs added to fuzz/corpus/{name}/fuzzed")
        return 0
    stats = args.stats or args.work / "stats.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in args.targets or TARGETS:
        total = run_target(name, args.seconds, args.work, stats, args.segment, args.timeout)
        crashes = sorted(p.name for p in (args.work / name / "crashes").iterdir()
                         if not p.name.endswith(".txt") and not p.name.startswith("slow-unit"))
        print(f"{name:17} {total['executions']:>9} executions in {total['seconds']:7.0f} s, "
              f"{len(crashes)} crash inputs" + (f" in {args.work / name / 'crashes'}" if crashes else ""))
        failed |= bool(crashes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
