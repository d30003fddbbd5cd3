"""Throughput and memory of `minisd serve`: requests per minute with 1 and with 8 concurrent `webuiapi` clients,
against the library called directly in this process (the reference: what the HTTP layer and the queue cost),
for the tiny test model and the bundled demo model; and the server's RSS over 200 requests (it must not grow
beyond the first few). The server runs as its own process (`python -m minisd serve`) so its RSS is its own."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

import minisd
from minisd.config import PRESETS
from minisd.testing import write_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: str, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "minisd", "serve", "--model", model, "--port",
                                         str(self.port), "--dtype", "fp32"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        deadline = time.monotonic() + 300
        while True:
            try:
                requests.get(f"{self.url}/sdapi/v1/options", timeout=5).raise_for_status()
                return
            except requests.RequestException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server for {model} did not start")
                time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def run_clients(url: str, payload: dict, clients: int, per_client: int) -> float:
    """Requests per minute of `clients` threads each sending `per_client` requests one after another."""
    import webuiapi
    host, port = url.rsplit(":", 1)
    errors = []

    def client(i: int) -> None:
        api = webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port))
        for k in range(per_client):
            try:
                api.txt2img(**{**payload, "seed": 1000 * i + k})
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return clients * per_client / elapsed * 60


def library_rpm(model: str, payload: dict, count: int) -> float:
    sd = minisd.load(model, dtype=torch.float32)
    kwargs = dict(width=payload["width"], height=payload["height"], steps=payload["steps"],
                  sampler=payload["sampler_name"], cfg_scale=payload["cfg_scale"])
    sd.txt2img(payload["prompt"], seed=0, **kwargs)  # warm-up
    start = time.perf_counter()
    for k in range(count):
        sd.txt2img(payload["prompt"], seed=k, **kwargs)
    return count / (time.perf_counter() - start) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16, help="timed requests per configuration (default 16)")
    parser.add_argument("--rss-requests", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the library run and of the server process (default: torch's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if os.getloadavg()[0] > 1.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f}; numbers will be noisy", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="minisd-bench-server-"))
    tiny = tmp / "tiny.safetensors"
    write_checkpoint(tiny, PRESETS["tiny"], seed=1)
    payload = dict(prompt="a red circle on the left, blue background", width=args.size, height=args.size,
                   steps=args.steps, sampler_name="DPM++ 2M", cfg_scale=7.0)
    rows, rss_rows = [], []
    for name, model in (("tiny (test)", str(tiny)), ("demo", "demo")):
        print(f"{name}: library ...", file=sys.stderr)
        direct = library_rpm(model, payload, args.requests)
        server = Server(model, args.threads)
        try:
            run_clients(server.url, payload, 1, 2)  # warm-up
            print(f"{name}: 1 client ...", file=sys.stderr)
            one = run_clients(server.url, payload, 1, args.requests)
            print(f"{name}: 8 clients ...", file=sys.stderr)
            eight = run_clients(server.url, payload, 8, max(1, args.requests // 8))
            rows.append((name, direct, one, eight))
            if model == str(tiny):
                done, marks = 2 + args.requests + 8 * max(1, args.requests // 8), []
                marks.append((done, rss_mib(server.process.pid)))
                while done < args.rss_requests:
                    step = min(40, args.rss_requests - done)
                    run_clients(server.url, {**payload, "steps": 2}, 8, max(1, step // 8))
                    done += 8 * max(1, step // 8)
                    marks.append((done, rss_mib(server.process.pid)))
                rss_rows = marks
        finally:
            server.close()

    print(f"\n{args.size}x{args.size}, {args.steps} steps, DPM++ 2M, fp32, {args.threads} torch thread(s) on each side,"
          f" {args.requests} timed requests per cell (8 clients: {8 * max(1, args.requests // 8)})")
    print("| model | library direct (req/min) | server, 1 client | server, 8 clients | 1 client / library |")
    print("|---|---|---|---|---|")
    for name, direct, one, eight in rows:
        print(f"| {name} | {direct:.1f} | {one:.1f} | {eight:.1f} | {one / direct:.2f} |")
    print("\nserver RSS (tiny model) after N requests (those after the timed ones: 2 steps each, 8 clients)")
    print("| requests | RSS MiB |")
    print("|---|---|")
    for count, rss in rss_rows:
        print(f"| {count} | {rss:.0f} |")


if __name__ == "__main__":
    main()
