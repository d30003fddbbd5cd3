"""The generation worker: one thread, one FIFO queue, one job on the model at a time (A1111's queue_lock), with
live progress (step counts, ETA, a latent preview: a fixed linear map, or TAESD when loaded) and interrupt/skip
at the next sampler step.
No web framework here: an HTTP layer (app.py) or any other host submits jobs and reads `progress()`."""
from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..image import tensor_to_pil
from ..params import GenerationParams
from .models import ModelCatalog, ModelEntry

# A1111's "Approx cheap" preview: a fixed linear map from the four SD 1.x latent channels to RGB in [-1, 1]
# (rows: latent channels; columns: R, G, B), so a preview costs one small matrix product, no VAE.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208],
                           [0.187, 0.286, 0.173],
                           [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])
PREVIEW_MIN_SIDE = 256  # previews of small latents are enlarged (nearest) to at least this many pixels


class _Stopped(Exception):
    """Raised from the sampler callback to stop a job; carries the last predicted clean latents."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("stopped")
        self.latents = latents


@dataclass
class GenerationJob:
    """One request in the queue: validated parameters (seed drawn), images, and an optional model override."""
    params: GenerationParams
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    model: ModelEntry | None = None
    task_id: str = field(default_factory=lambda: f"task({uuid.uuid4().hex[:15]})")
    number: int = -1            # order of submission (set by the worker)
    started: int = -1           # order of starting on the model
    future: Future = field(default_factory=Future)

    @property
    def task(self) -> str:
        return "inpaint" if self.mask_image is not None else "img2img" if self.init_image is not None else "txt2img"


@dataclass
class GenerationResult:
    """Images (each with `.info["parameters"]` and `.info["seed"]`) and what made them."""
    images: list[Image.Image]
    params: GenerationParams
    model: ModelEntry
    model_hash: str
    task: str
    task_id: str
    number: int
    started: int
    interrupted: bool
    job_timestamp: str

    @property
    def seeds(self) -> list[int]:
        return [image.info["seed"] for image in self.images]

    @property
    def infotexts(self) -> list[str]:
        return [image.info["parameters"] for image in self.images]


@dataclass
class _ModelSwitch:
    model: ModelEntry
    future: Future = field(default_factory=Future)


class GenerationWorker:
    """Runs queued jobs one after the other on the catalog's models; thread-safe to submit, read and interrupt."""

    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog
        self._queue: queue.Queue = queue.Queue()
        self._numbers = itertools.count()
        self._starts = itertools.count()
        self._lock = threading.Lock()
        self._pending = 0
        self._state = self._idle_state()
        self._latent: torch.Tensor | None = None
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control ------------------------------------------------------------------------------------------

    def start(self) -> "GenerationWorker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minisd-generation", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, then stop (queued jobs behind it are cancelled)."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: GenerationJob) -> Future:
        """Queue a job; the future gives a GenerationResult (or the job's exception)."""
        with self._lock:
            job.number = next(self._numbers)
            self._pending += 1
            self._queue.put(job)
        return job.future

    def switch_model(self, model: ModelEntry) -> Future:
        """Make `model` the current one, after the jobs already queued (the future gives the loaded model)."""
        switch = _ModelSwitch(model)
        with self._lock:
            self._pending += 1
            self._queue.put(switch)
        return switch.future

    def interrupt(self) -> None:
        """Stop the running job at its next sampler step; it returns what it has made so far."""
        with self._lock:
            if self._state["job_count"]:
                self._interrupt.set()
                self._state["interrupted"] = True

    def skip(self) -> None:
        """Stop the current batch of the running job at its next step and go on with the next batch."""
        with self._lock:
            if self._state["job_count"]:
                self._skip.set()
                self._state["skipped"] = True

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._pending

    # ---- progress -----------------------------------------------------------------------------------------

    @staticmethod
    def _idle_state() -> dict:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}

    def progress(self, skip_current_image: bool = False) -> dict:
        """A1111's /sdapi/v1/progress answer: progress 0..1 over all batches, ETA, state, preview (base64 PNG)."""
        with self._lock:
            state, latent, started, task_id = dict(self._state), self._latent, self._started_at, self._task_id
            queued, model = self._pending, self._model
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "current_task": None, "queue_size": queued}
        done = state["job_no"] / state["job_count"]
        if state["sampling_steps"]:
            done += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
        elapsed = time.monotonic() - started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        image = None
        if not skip_current_image and latent is not None:
            image = _png_base64(preview_image(model, latent))
        return {"progress": min(done, 1.0), "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": None, "current_task": task_id, "queue_size": queued}

    _started_at = 0.0
    _task_id: str | None = None
    _model = None

    # ---- the worker thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._cancel_queued()
                return
            try:
                if not item.future.set_running_or_notify_cancel():
                    continue
                try:
                    if isinstance(item, _ModelSwitch):
                        result = self.catalog.get(item.model)
                        self.catalog.current = item.model
                    else:
                        result = self._run(item)
                except BaseException as e:  # the job's error goes to its caller; the worker lives on
                    item.future.set_exception(e)
                else:
                    item.future.set_result(result)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._latent = None
                    flags = {k: self._state[k] for k in ("skipped", "interrupted")}
                    self._state = {**self._idle_state(), **flags}
                    self._task_id = self._model = None

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.cancel()

    def _run(self, job: GenerationJob) -> GenerationResult:
        entry = job.model or self.catalog.current
        sd = self.catalog.get(entry)
        p = job.params
        timestamp = time.strftime("%Y%m%d%H%M%S")
        with self._lock:
            job.started = next(self._starts)
            self._interrupt.clear()
            self._skip.clear()
            self._state = {**self._idle_state(), "job": job.task, "job_count": p.n_iter,
                           "job_timestamp": timestamp, "sampling_steps": p.steps}
            self._started_at = time.monotonic()
            self._task_id, self._model = job.task_id, sd

        def report(info: dict) -> None:
            with self._lock:
                self._state["sampling_step"] = info["i"] + 1
                self._state["sampling_steps"] = info["steps"]
                self._latent = info["denoised"]
            if self._interrupt.is_set() or self._skip.is_set():
                raise _Stopped(info["denoised"])

        images: list[Image.Image] = []
        for iteration in range(p.n_iter):
            if self._interrupt.is_set():
                break
            self._skip.clear()
            with self._lock:
                self._state.update(job_no=iteration, sampling_step=0, skipped=False)
            # Batch i of n_iter is a run of its own with seed + i * batch_size (with a variation seed: the same seed
            # and subseed + i * batch_size, as A1111): the same images as one call.
            offset = iteration * p.batch_size
            batch = dataclasses.replace(p, n_iter=1, seed=p.seed if p.subseed_strength else p.seed + offset,
                                        subseed=p.subseed + offset)
            try:
                images += sd.generate(batch, init_image=job.init_image, mask_image=job.mask_image, callback=report)
            except _Stopped as stop:
                images += self._partial_images(sd, batch, stop.latents, job.task)
        return GenerationResult(images=images, params=p, model=entry, model_hash=sd.model_hash, task=job.task,
                                task_id=job.task_id, number=job.number, started=job.started,
                                interrupted=self._interrupt.is_set(), job_timestamp=timestamp)

    @staticmethod
    def _partial_images(sd, p: GenerationParams, latents: torch.Tensor, task: str) -> list[Image.Image]:
        """The last predicted clean latents of a stopped batch, decoded (as A1111 returns an interrupted job)."""
        with torch.inference_mode():
            pixels = sd.decode_latents(latents)
        from .. import __version__
        extra = getattr(sd, "infotext_fields", dict)()  # the model's VAE/LoRA/embedding fields, where it has them
        out = []
        for j, image in enumerate(tensor_to_pil(pixels)):
            seed = p.seed + j
            image.info["parameters"] = p.infotext(seed, model_hash=sd.model_hash, model_name=sd.model_name,
                                                  version=f"minisd {__version__}", task=task, extra=extra or None)
            image.info["seed"] = seed
            out.append(image)
        return out


def preview_image(sd, latents: torch.Tensor) -> Image.Image:
    """The live preview: the model's tiny decoder (TAESD) when it has one loaded, else the fixed linear map."""
    taesd = getattr(sd, "taesd", None)
    if taesd is not None and getattr(taesd, "decoder", None) is not None:
        return tensor_to_pil(sd.preview_latents(latents[:1]))[0]
    return latent_preview(latents)


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """The first latent of a batch as RGB through the fixed 4→3 map, enlarged to be visible."""
    with torch.inference_mode():
        z = latents[0].detach().float().cpu()
        if z.shape[0] != LATENT_RGB.shape[0]:
            z = z[:LATENT_RGB.shape[0]]
        rgb = torch.einsum("chw,cr->rhw", z, LATENT_RGB[:z.shape[0]])
        image = tensor_to_pil(rgb[None].clamp(-1, 1))[0]
    scale = max(1, -(-PREVIEW_MIN_SIDE // max(1, min(image.size))))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
