"""minisd on a Ray cluster (the optional extra `minisd[ray]`): `minisd batch --ray` over Ray Data (an actor pool,
each worker loading the model once) and `minisd serve --ray` as a Ray Serve application. Only imported by the
commands that need it; the core never imports ray."""
from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .batch import BatchLine, LineGenerator, LineOutcome
from .errors import ParameterError

# Columns of a generated batch: one row per JSONL line; the image travels as raw pixels so that the driver
# encodes the PNG (with its infotext) exactly as a local run does.
OUTCOME_COLUMNS = ("index", "error", "pixels", "mode", "width", "height", "infotext", "seed", "seconds", "worker")


def require_ray(command: str):
    """Import ray, or raise the one-line message that names the extra."""
    if importlib.util.find_spec("ray") is None:
        raise ParameterError(f"{command} needs Ray: pip install 'minisd[ray]'")
    import ray
    return ray


def connect(address: str | None):
    """Attach to the cluster at `address` (or $RAY_ADDRESS, else start a local one); reuse an open connection."""
    ray = require_ray("--ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise ParameterError(f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS'}: {e}") from None
    return ray


# ---- batch: Ray Data ----------------------------------------------------------------------------------------

class RayLineGenerator:
    """The Ray Data callable class: constructed once per worker actor (so the model loads once per worker),
    then called with batches of rows {index, request (JSON)}."""

    def __init__(self, model: str, device: str | None, dtype: str | None):
        import ray

        from .precision import DTYPES

        # Ray sets OMP_NUM_THREADS to the actor's CPUs, so torch uses as many threads as the worker has CPUs.
        self.generate = LineGenerator(device, DTYPES[dtype] if dtype else None)
        self.generate.worker += f"@{ray.get_runtime_context().get_node_id()[:12]}"  # host:pid@node
        try:
            self.generate.model(model)  # now, not on the first line
        except Exception:  # noqa: BLE001 - a constructor that raises is restarted forever; each line reports it
            pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        columns: dict[str, list] = {name: [] for name in OUTCOME_COLUMNS}
        for index, request in zip(batch["index"], batch["request"]):
            outcome = self.generate(int(index), json.loads(request))
            image = outcome.image
            values = {"index": outcome.index, "error": outcome.error, "infotext": outcome.infotext,
                      "seed": int(outcome.seed), "seconds": outcome.seconds, "worker": outcome.worker,
                      "pixels": image.tobytes() if image else b"", "mode": image.mode if image else "",
                      "width": image.width if image else 0, "height": image.height if image else 0}
            for name in OUTCOME_COLUMNS:
                columns[name].append(values[name])
        return {name: np.array(values, dtype=object if name in ("pixels", "error", "infotext", "worker", "mode")
                               else None) for name, values in columns.items()}


def _outcome(row: dict) -> LineOutcome:
    image = None
    if not row["error"]:
        image = Image.frombytes(row["mode"], (int(row["width"]), int(row["height"])), bytes(row["pixels"]))
    return LineOutcome(int(row["index"]), image, row["infotext"], int(row["seed"]), row["error"],
                       float(row["seconds"]), row["worker"])


def ray_outcomes(*, workers: int = 1, address: str | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float | None = None, device: str | None = None, dtype: str | None = None):
    """The `outcomes` function of `batch.run_batch` that generates on a Ray cluster: one row per block (so the
    lines spread over the workers and a lost worker costs one line), rows keyed by index, order not kept."""
    if workers < 1:
        raise ParameterError(f"--workers must be at least 1, got {workers}")

    def outcomes(lines: list[BatchLine]) -> Iterator[LineOutcome]:
        if not lines:
            return
        ray = connect(address)
        gpus = gpus_per_worker
        if gpus is None:  # a worker per GPU when the cluster has GPUs
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows one bar of its own
        context.print_on_execution_start = False
        model = Counter(line.request["model"] for line in lines).most_common(1)[0][0]  # loaded by every worker
        rows = [{"index": line.index, "request": json.dumps(line.request)} for line in lines]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        generated = dataset.map_batches(
            RayLineGenerator, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker, num_gpus=gpus, batch_format="numpy",
            fn_constructor_kwargs={"model": model, "device": device, "dtype": dtype})
        for row in generated.iter_rows():
            yield _outcome(row)

    return outcomes


# ---- serve: Ray Serve ---------------------------------------------------------------------------------------
# One ingress replica runs the unchanged FastAPI app of `minisd serve` (it holds the job state that progress,
# interrupt and skip read); its models are `RemoteModel`s whose generation runs on the replicas of
# `GenerationDeployment`, streaming each sampler step back so that progress and interrupt work as in one process.

class GenerationDeployment:
    """A generation replica: loads models on demand (keeps the last one) and generates one request at a time."""

    def __init__(self, device: str | None = None, dtype: str | None = None, preload: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from .precision import DTYPES

        self.lines = LineGenerator(device, DTYPES[dtype] if dtype else None)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="minisd-generate")  # the model: one job at a time
        if preload:
            self.lines.model(preload)

    async def _on_model(self, fn, *args):
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def describe(self, source: str) -> dict:
        """What the ingress needs to know of a model without loading it: its config, hash, name, infotext fields."""
        def describe():
            sd = self.lines.model(source)
            return {"config": sd.config, "model_hash": sd.model_hash, "model_name": sd.model_name,
                    "infotext_fields": sd.infotext_fields()}
        return await self._on_model(describe)

    async def decode(self, source: str, latents):
        """Latents -> pixels in [-1, 1] (an interrupted job's partial images)."""
        import torch

        def decode():
            with torch.inference_mode():
                return self.lines.model(source).decode_latents(latents).cpu()
        return await self._on_model(decode)

    async def generate(self, source: str, params, init_image=None, mask_image=None):
        """Stream {"i", "steps", "denoised"} for every sampler step, then {"images": [...]}. A cancelled stream
        (the client interrupted) stops the generation at its next step."""
        import asyncio
        import threading

        loop = asyncio.get_running_loop()
        messages: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def report(info: dict) -> None:
            message = {"i": info["i"], "steps": info["steps"], "denoised": info["denoised"].detach().cpu()}
            loop.call_soon_threadsafe(messages.put_nowait, message)
            if cancelled.is_set():
                raise _StreamCancelled()

        def work():
            return self.lines.model(source).generate(params, init_image=init_image, mask_image=mask_image,
                                                     callback=report)
        def finished(future) -> None:
            if not future.cancelled():
                future.exception()  # retrieved here: a stream cancelled mid-way never awaits it
            messages.put_nowait(None)
        done = asyncio.ensure_future(self._on_model(work))
        done.add_done_callback(finished)
        try:
            while (message := await messages.get()) is not None:
                yield message
            yield {"images": await done}
        finally:
            cancelled.set()


class _StreamCancelled(Exception):
    """Ends a generation whose caller went away."""


class RemoteModel:
    """Stands in for a loaded StableDiffusion on the ingress (what server/jobs.py and app.py use of one):
    `generate` and `decode_latents` run on the generation deployment; the rest comes from `describe`."""

    def __init__(self, handle, source: str, description: dict):
        self.handle, self.source = handle, source
        self.config = description["config"]
        self.model_hash, self.model_name = description["model_hash"], description["model_name"]
        self._infotext_fields = description["infotext_fields"]

    def infotext_fields(self) -> dict:
        return dict(self._infotext_fields)

    def generate(self, params, init_image=None, mask_image=None, noise=None, callback=None):
        if noise is not None:
            raise ParameterError("caller-supplied noise is not sent to remote replicas")
        stream = self.handle.options(stream=True).generate.remote(self.source, params, init_image, mask_image)
        try:
            for message in stream:
                if "images" in message:
                    return message["images"]
                if callback is not None:
                    callback(message)  # raises to stop (interrupt/skip): the stream is cancelled below
        except BaseException as e:
            stream.cancel()
            raise _cause(e) from None
        raise RuntimeError("the generation replica ended its stream without images")

    def decode_latents(self, latents, tiled: bool = False):
        try:
            return self.handle.decode.remote(self.source, latents.cpu()).result()
        except Exception as e:
            raise _cause(e) from None


def _cause(error: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (a ParameterError stays a ParameterError, one line)."""
    from ray.exceptions import RayTaskError
    cause = getattr(error, "cause", None)
    return cause if isinstance(error, RayTaskError) and isinstance(cause, Exception) else error


class RemoteLoader:
    """The ModelCatalog loader of the ingress: a RemoteModel per file (described once by a replica)."""

    def __init__(self, handle, known: dict | None = None):
        self.handle, self.known = handle, dict(known or {})

    def __call__(self, path) -> RemoteModel:
        source = str(path)
        if source not in self.known:
            self.known[source] = _result(self.handle.describe.remote(source))
        return RemoteModel(self.handle, source, self.known[source])


def _result(response):
    try:
        return response.result()
    except Exception as e:
        raise _cause(e) from None


class WorkerPool:
    """Several server GenerationWorkers over one catalog, so that as many jobs run at once as there are
    generation replicas; duck-types GenerationWorker for the app. Progress shows the running job that is
    furthest along (A1111 has one); interrupt and skip reach every running job."""

    def __init__(self, catalog, size: int):
        import threading

        from .server.jobs import GenerationWorker

        self.workers = [GenerationWorker(catalog) for _ in range(max(1, size))]
        self._lock = threading.Lock()

    def start(self) -> "WorkerPool":
        for worker in self.workers:
            worker.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        for worker in self.workers:
            worker.stop(timeout)

    def submit(self, job):
        with self._lock:
            return min(self.workers, key=lambda w: w.pending).submit(job)

    def switch_model(self, model):
        with self._lock:
            return min(self.workers, key=lambda w: w.pending).switch_model(model)

    def interrupt(self) -> None:
        for worker in self.workers:
            worker.interrupt()

    def skip(self) -> None:
        for worker in self.workers:
            worker.skip()

    @property
    def pending(self) -> int:
        return sum(worker.pending for worker in self.workers)

    def progress(self, skip_current_image: bool = False) -> dict:
        answers = [worker.progress(skip_current_image) for worker in self.workers]
        running = [a for a in answers if a["state"]["job_count"]]
        answer = max(running, key=lambda a: a["progress"]) if running else answers[0]
        return {**answer, "queue_size": self.pending}


class ServeIngress:
    """The ingress deployment's class: builds the server's app at replica start with remote models."""

    def __init__(self, generator, settings: dict):
        self.generator, self.settings = generator, dict(settings)

    async def __serve_build_asgi_app__(self):
        from .checkpoint import resolve_source
        from .server.app import create_app
        from .server.models import ModelCatalog

        s = self.settings
        known = {}
        if s["model"]:  # described here, awaited: the app's constructor then finds it without blocking the loop
            source = str(Path(resolve_source(s["model"])).resolve())
            known[source] = await self.generator.describe.remote(source)
        catalog = ModelCatalog(s["model"], s["models_dir"], loader=RemoteLoader(self.generator, known),
                               keep_loaded=1 << 20)  # proxies cost nothing: keep every one
        return create_app(catalog=catalog, worker=WorkerPool(catalog, s["jobs"]), api_auth=s["api_auth"],
                          max_size=s["max_size"], max_batch=s["max_batch"])


def serve_application(model: str | None, models_dir: str | None = None, *, replicas: int = 1,
                      autoscale: tuple[int, int] | None = None, device: str | None = None, dtype: str | None = None,
                      cpus_per_replica: float = 1.0, gpus_per_replica: float | None = None,
                      api_auth: str | None = None, max_size: int = 2048, max_batch: int = 16):
    """The Ray Serve application of `minisd serve --ray` (bound, not yet running): ingress -> generation."""
    ray = require_ray("minisd serve --ray")
    from ray import serve

    gpus = gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if autoscale is not None:
        low, high = autoscale
        if not 1 <= low <= high:
            raise ParameterError(f"--autoscale MIN,MAX needs 1 <= MIN <= MAX, got {low},{high}")
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 1,
                                          "upscale_delay_s": 5, "downscale_delay_s": 60}}
        jobs = high
    else:
        if replicas < 1:
            raise ParameterError(f"--replicas must be at least 1, got {replicas}")
        scaling, jobs = {"num_replicas": replicas}, replicas
    from .checkpoint import resolve_source
    preload = str(Path(resolve_source(model)).resolve()) if model else None
    generator = serve.deployment(GenerationDeployment, name="MinisdGeneration",
                                 ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
                                 max_ongoing_requests=1, **scaling)
    ingress = serve.deployment(serve.ingress()(ServeIngress), name="MinisdIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0})
    settings = {"model": model, "models_dir": models_dir, "jobs": jobs, "api_auth": api_auth,
                "max_size": max_size, "max_batch": max_batch}
    return ingress.bind(generator.bind(device, dtype, preload), settings)


def run_serve(app, *, address: str | None, host: str, port: int) -> None:
    """Start the application on the cluster and serve until Ctrl-C (or SIGTERM), then remove it."""
    import signal
    import sys
    import time

    connect(address)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: clean up as for Ctrl-C
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="minisd", route_prefix="/")
    print(f"minisd on Ray Serve: http://{host}:{port}/ (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete("minisd")
        ray_module = require_ray("minisd serve --ray")
        ray_module.shutdown()
