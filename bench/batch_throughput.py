"""Images per minute of `minisd batch` for 24 prompts on the demo model: one local process against Ray Data
with 1 and 2 workers, plus what Ray costs before the first image (cluster start, a worker's start and model
load), and the throughput this predicts for N machines. Usage: python bench/batch_throughput.py [-n 24]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "on the right", "in the middle"]


def prompts(n: int) -> list[dict]:
    """Captions in the demo model's grammar, no seeds (each line gets --seed + its index)."""
    return [{"prompt": f"a {COLOURS[i % 4]} {SHAPES[i % 3]} {PLACES[(i // 3) % 3]}, "
                       f"{COLOURS[(i + 2) % 4]} background"} for i in range(n)]


def timed_batch(jsonl: Path, outcomes, label: str) -> dict:
    from minisd.batch import ResultsWriter, read_lines, run_batch

    outdir = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
    start = time.perf_counter()
    summary = run_batch(read_lines(jsonl, model="demo"), ResultsWriter(outdir), outcomes, quiet=True)
    wall = time.perf_counter() - start
    entries = [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]
    assert summary.failed == 0, [e for e in entries if e["status"] != "ok"][:1]
    per_image = statistics.median(e["seconds"] for e in entries)  # generation only, on its worker
    return {"label": label, "wall": wall, "images": summary.written, "per_image": per_image,
            "workers": len({e["worker"] for e in entries}), "outdir": outdir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="precision on both sides (default fp32: the same on every host)")
    parser.add_argument("--local-threads", default="0,1", help="torch threads of the local runs, comma "
                        "separated; 0 = torch's default (all cores). 1 matches a 1-CPU Ray worker bit for bit")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} at start; numbers from a busy machine mislead", file=sys.stderr)

    import torch

    import minisd
    from minisd.batch import local_outcomes
    from minisd.precision import DTYPES

    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({**row, "steps": args.steps}) + "\n" for row in prompts(args.prompts)))

    start = time.perf_counter()
    minisd.load("demo", dtype=DTYPES[args.dtype])
    local_load = time.perf_counter() - start
    rows = []
    default_threads = torch.get_num_threads()
    for threads in (int(t) for t in args.local_threads.split(",")):
        torch.set_num_threads(threads or default_threads)
        rows.append(timed_batch(jsonl, local_outcomes(dtype=DTYPES[args.dtype]),
                                f"local-{threads or default_threads}t"))
        rows[-1]["startup"] = local_load
    torch.set_num_threads(default_threads)
    local_rows = len(rows)

    import ray

    from minisd.ray_backend import ray_outcomes
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start

    @ray.remote(num_cpus=1)
    class Loader:
        """A worker process like a Ray Data actor: imports torch and minisd, loads the demo model."""
        def __init__(self, dtype):
            import minisd
            from minisd.precision import DTYPES
            minisd.load("demo", dtype=DTYPES[dtype])

        def ready(self):
            return True

    worker_starts = []
    for _ in range(2):
        start = time.perf_counter()
        actor = Loader.remote(args.dtype)
        ray.get(actor.ready.remote())
        worker_starts.append(time.perf_counter() - start)
        ray.kill(actor)
    for workers in (1, 2):
        row = timed_batch(jsonl, ray_outcomes(workers=workers, dtype=args.dtype), f"ray-{workers}")
        row["startup"] = row["wall"] - args.prompts * row["per_image"] / workers
        rows.append(row)
    ray.shutdown()

    one_thread = next((row for row in rows if row["label"] == "local-1t"), rows[0])
    identical = all((one_thread["outdir"] / name).read_bytes() == (row["outdir"] / name).read_bytes()
                    for row in rows[local_rows:] for name in os.listdir(one_thread["outdir"])
                    if name.endswith(".png"))
    print(f"{args.prompts} prompts, demo model, 64x64, {args.steps} steps, {args.dtype}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}\n")
    print(f"{'run':10} {'wall s':>8} {'img/min':>8} {'s/img (gen)':>12} {'img/min steady':>15} {'overhead s':>11}")
    for row in rows:
        workers = 1 if row["label"].startswith("local") else int(row["label"].split("-")[1])
        steady = 60 * workers / row["per_image"]
        print(f"{row['label']:10} {row['wall']:8.1f} {60 * row['images'] / row['wall']:8.1f} "
              f"{row['per_image']:12.2f} {steady:15.1f} {row['startup']:11.1f}")
    print(f"\nlocal model load: {local_load:.1f} s;  ray.init (local cluster): {ray_start:.1f} s;  "
          f"a Ray worker's start + model load: {', '.join(f'{s:.1f}' for s in worker_starts)} s")
    print(f"Ray images byte-identical to the {one_thread['label']} run's: {identical} "
          "(a different thread count may round a pixel differently)")
    per_worker = 60 / rows[local_rows]["per_image"]
    overhead = ray_start + max(worker_starts)
    print(f"\nN machines, one 1-CPU worker each at the measured {per_worker:.1f} img/min per worker, "
          f"{overhead:.0f} s start-up:")
    for n, images in ((1, 1000), (8, 1000), (32, 10000), (100, 100000)):
        minutes = overhead / 60 + images / (n * per_worker)
        print(f"  {n:4} workers: {n * per_worker:8.0f} img/min;  {images:6} images in {minutes:7.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
