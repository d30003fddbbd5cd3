"""`minisd batch --ray` on a local Ray cluster and on a simulated two-node cluster: the same images as a local
run whatever the number of workers, every line exactly once when a worker is killed mid-run, resume, and a bad
line reported while the rest finish. One cluster per module: Ray's start-up is slow on two cores."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")  # the optional extra minisd[ray]; `make test` installs it

from minisd.batch import ResultsWriter, local_outcomes, read_lines, run_batch  # noqa: E402
from minisd.ray_backend import ray_outcomes  # noqa: E402

# No telemetry, no auth token written under ~/.ray, no Ray progress bars; set before any cluster starts so that
# the workers (and the CLI subprocesses) inherit them.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
os.environ.update(RAY_ENV)

GOOD_LINES = 12
BAD_INDEX = 5  # a line that fails on the worker, not on the driver


def prompts_file(folder: Path) -> Path:
    samplers = ["Euler a", "DPM++ 2M", "Euler", "DDIM"]
    rows = [{"prompt": f"a shape number {i}", "size": "32x32", "steps": 3, "sampler": samplers[i % 4]}
            for i in range(GOOD_LINES)]
    for row in rows[::3]:
        row["seed"] = 1000 + len(row["prompt"])  # some lines bring their own seed
    rows.insert(BAD_INDEX, {"prompt": "needs an init image", "size": "32x32", "init_image": "nowhere.png"})
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def images(outdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outdir.glob("*.png"))}


def entries(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoint):
    """The prompts and the local single-process run's output folder; one torch thread like a 1-CPU Ray worker
    (a different thread count may round a pixel differently)."""
    folder = tmp_path_factory.mktemp("batch")
    jsonl = prompts_file(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_batch(read_lines(jsonl, model=str(tiny_checkpoint)), ResultsWriter(folder / "local"),
                            local_outcomes(dtype=torch.float32), quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert (summary.written, summary.failed) == (GOOD_LINES, 1)
    return jsonl, folder / "local"


def run_on_ray(jsonl: Path, outdir: Path, model: Path, workers: int, on_result=None):
    seen = []

    def record(entry: dict) -> None:
        seen.append(entry)
        if on_result is not None:
            on_result(entry)
    summary = run_batch(read_lines(jsonl, model=str(model)), ResultsWriter(outdir),
                        ray_outcomes(workers=workers, dtype="fp32"), quiet=True, on_result=record)
    return summary, seen


def check_outputs(outdir: Path, reference_dir: Path) -> list[dict]:
    assert images(outdir) == images(reference_dir)  # byte-identical PNGs, infotext included
    assert len(images(outdir)) == GOOD_LINES
    found = entries(outdir)
    assert [e["index"] for e in found] == list(range(GOOD_LINES + 1))
    bad = found[BAD_INDEX]
    assert bad["status"] == "error"
    assert bad["error"] == f"line {BAD_INDEX + 1}: {reference_dir.parent / 'nowhere.png'}: init image not found"
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_gives_the_local_images_with_any_number_of_workers(local_ray, reference, tiny_checkpoint, tmp_path,
                                                                 workers):
    jsonl, local = reference
    summary, seen = run_on_ray(jsonl, tmp_path / "out", tiny_checkpoint, workers)
    assert (summary.written, summary.failed) == (GOOD_LINES, 1)
    found = check_outputs(tmp_path / "out", local)
    made_by = {e["worker"] for e in found if e["status"] == "ok"}
    assert len(made_by) == workers  # the lines really were spread over the workers


def test_every_line_once_when_a_worker_is_killed(local_ray, reference, tiny_checkpoint, tmp_path):
    jsonl, local = reference
    killed = []

    def kill_first_worker(entry: dict) -> None:
        if not killed and entry["status"] == "ok":
            pid = int(entry["worker"].split("@")[0].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)  # the actor dies in the middle of its next line
            killed.append(pid)

    summary, seen = run_on_ray(jsonl, tmp_path / "out", tiny_checkpoint, 2, on_result=kill_first_worker)
    assert killed
    assert sorted(e["index"] for e in seen) == list(range(GOOD_LINES + 1))  # each line exactly once
    assert (summary.written, summary.failed) == (GOOD_LINES, 1)
    check_outputs(tmp_path / "out", local)


def test_cli_resumes_on_a_cluster_by_address(local_ray, reference, tiny_checkpoint, tmp_path):
    jsonl, local = reference
    out = tmp_path / "out"
    shutil.copytree(local, out)
    for index in (0, 7, 11):
        (out / f"{index:06d}.png").unlink()
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "minisd", "batch", str(jsonl), "--outdir", str(out), "-m",
                           str(tiny_checkpoint), "--dtype", "fp32", "--ray", "--address", address, "-q"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 1, done.stderr  # the bad line still fails
    assert done.stdout.splitlines()[-1] == f"wrote 3 images to {out}, {GOOD_LINES - 3} already done"
    found = check_outputs(out, local)
    assert len({found[i]["worker"] for i in (0, 7, 11)}) == 1 and found[0]["worker"] != found[1]["worker"]


def test_two_node_cluster(reference, tiny_checkpoint, tmp_path):
    """Two simulated nodes of one CPU each: a worker on each, the images still those of the local run."""
    from ray.cluster_utils import Cluster

    jsonl, local = reference
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "minisd", "batch", str(jsonl), "--outdir", str(out), "-m",
                               str(tiny_checkpoint), "--dtype", "fp32", "--ray", "--address", cluster.address,
                               "--workers", "2", "-q"],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
        assert done.returncode == 1, done.stderr
        found = check_outputs(out, local)
        nodes = {e["worker"].split("@")[1] for e in found if e["status"] == "ok"}
        assert len(nodes) == 2
    finally:
        cluster.shutdown()


# ---- minisd serve --ray -------------------------------------------------------------------------------------

SERVE_PROMPTS = [dict(prompt=f"a shape number {i}", negative_prompt="blurry", width=32, height=32, steps=3,
                      seed=200 + i, sampler_name=["Euler a", "DPM++ 2M"][i % 2], cfg_scale=6) for i in range(8)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny model and a file that is not a checkpoint, for a client to switch to."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint")
    return folder


@pytest.fixture(scope="module")
def plain_server(models_dir):
    """The single-process server on the same files; one torch thread like a 1-CPU replica."""
    pytest.importorskip("fastapi")
    from minisd.server.app import ServerThread, create_app
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(create_app(str(models_dir / "tiny.safetensors"), str(models_dir), dtype=torch.float32,
                                     max_size=256)) as running:
            yield running
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_server(local_ray, models_dir):
    """`minisd serve --ray --replicas 2` on the module's cluster: the ingress and two generation replicas."""
    from ray import serve

    from minisd.ray_backend import serve_application
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_application(str(models_dir / "tiny.safetensors"), str(models_dir), replicas=2, dtype="fp32",
                                max_size=256), name="minisd", route_prefix="/")
    yield port
    serve.shutdown()


def served_by(replica_logs: Path) -> dict[str, int]:
    """Generation calls per replica, from Ray Serve's own per-replica access logs."""
    return {log.name: log.read_text().count("CALL generate OK")
            for log in replica_logs.glob("replica_minisd_MinisdGeneration_*.log")}


def test_serve_answers_webuiapi_as_the_plain_server(ray_server, plain_server):
    import numpy as np
    import requests
    import webuiapi

    on_ray = webuiapi.WebUIApi(host="127.0.0.1", port=ray_server)
    plain = webuiapi.WebUIApi(host="127.0.0.1", port=plain_server.port)
    got, expected = on_ray.txt2img(**SERVE_PROMPTS[0]), plain.txt2img(**SERVE_PROMPTS[0])
    assert np.array_equal(np.asarray(got.image), np.asarray(expected.image))
    assert got.info["infotexts"] == expected.info["infotexts"]
    assert "Seed: 200," in got.info["infotexts"][0]
    init = got.image
    got = on_ray.img2img(images=[init], prompt="again", width=32, height=32, steps=3, seed=9, denoising_strength=0.5)
    expected = plain.img2img(images=[init], prompt="again", width=32, height=32, steps=3, seed=9,
                             denoising_strength=0.5)
    assert np.array_equal(np.asarray(got.image), np.asarray(expected.image))
    for path in ("sd-models", "samplers", "options"):  # the same answers from the same app
        assert requests.get(f"http://127.0.0.1:{ray_server}/sdapi/v1/{path}").json() == \
            requests.get(f"{plain_server.url}/sdapi/v1/{path}").json()
    for body in ({"prompt": "x", "steps": 0, "width": 32, "height": 32}, {"prompt": "x", "width": 4096}):
        bad = requests.post(f"http://127.0.0.1:{ray_server}/sdapi/v1/txt2img", json=body)
        same = requests.post(f"{plain_server.url}/sdapi/v1/txt2img", json=body)
        assert (bad.status_code, bad.json()) == (same.status_code, same.json())
        assert bad.status_code == 422
    # A model that fails to load on a replica: the loader's one-line error, as from the plain server.
    switch = {"sd_model_checkpoint": "broken.safetensors"}
    bad = requests.post(f"http://127.0.0.1:{ray_server}/sdapi/v1/options", json=switch)
    same = requests.post(f"{plain_server.url}/sdapi/v1/options", json=switch)
    assert (bad.status_code, bad.json()) == (same.status_code, same.json())
    assert bad.status_code == 422 and "broken.safetensors" in bad.json()["detail"]
    assert on_ray.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors")


def test_two_replicas_serve_eight_concurrent_clients(ray_server, plain_server):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import webuiapi
    from ray import serve

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    before = served_by(logs)

    def client(kwargs: dict):
        return webuiapi.WebUIApi(host="127.0.0.1", port=ray_server).txt2img(**kwargs)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, SERVE_PROMPTS))
    plain = webuiapi.WebUIApi(host="127.0.0.1", port=plain_server.port)
    for kwargs, got in zip(SERVE_PROMPTS, results):
        expected = plain.txt2img(**kwargs)
        assert np.array_equal(np.asarray(got.image), np.asarray(expected.image))
        assert got.info["infotexts"] == expected.info["infotexts"]
    status = serve.status().applications["minisd"].deployments["MinisdGeneration"]
    assert status.replica_states == {"RUNNING": 2}
    after = served_by(logs)
    calls = {name: after[name] - before.get(name, 0) for name in after}
    assert len(calls) == 2 and sum(calls.values()) == 8 and min(calls.values()) >= 1, calls


def test_progress_and_interrupt_reach_the_replica(ray_server):
    """The replica streams every step to the ingress: progress and its preview move, interrupt stops the job at
    the next step and answers with the last prediction decoded on a replica."""
    import threading
    import time

    import numpy as np
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=ray_server)
    results = {}
    job = threading.Thread(target=lambda: results.update(r=api.txt2img(
        prompt="a slow one", seed=3, steps=1000, width=32, height=32, sampler_name="Euler")))
    job.start()
    seen = None
    for _ in range(600):
        answer = api.get_progress()
        if answer["state"]["sampling_step"] >= 3:
            if seen is None:
                seen = answer
            elif answer["state"]["sampling_step"] > seen["state"]["sampling_step"]:
                break
        time.sleep(0.1)
    assert seen is not None and seen["state"]["sampling_steps"] == 1000 and seen["current_image"]
    assert answer["progress"] > seen["progress"] > 0
    api.interrupt()
    job.join(120)
    r = results["r"]
    assert r.info["minisd_job"]["interrupted"] is True and r.image.size == (32, 32)
    assert api.get_progress()["state"]["job_count"] == 0
    assert np.asarray(r.image).std() > 0  # a real decode, not a blank


def test_autoscale_configuration(tiny_checkpoint):
    """--autoscale MIN,MAX becomes Ray Serve's autoscaling on ongoing requests (the names Ray 2.51+ accepts)."""
    from minisd.errors import ParameterError
    from minisd.ray_backend import serve_application

    ingress = serve_application(str(tiny_checkpoint), autoscale=(1, 3), gpus_per_replica=0)._bound_deployment
    generator = ingress.init_args[0]._bound_deployment
    scaling = generator._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 1)
    assert generator.max_ongoing_requests == 1 and generator.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0}
    assert ingress.num_replicas == 1  # the job state lives in one ingress replica
    assert ingress.init_args[1]["jobs"] == 3  # the ingress can keep every replica busy
    with pytest.raises(ParameterError, match="MIN <= MAX"):
        serve_application(str(tiny_checkpoint), autoscale=(3, 1))
