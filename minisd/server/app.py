"""The FastAPI app factory: A1111's /sdapi/v1 endpoints, OpenAI's images endpoint and the web page in front of
one GenerationWorker. `create_app(...)` builds everything and starts nothing until the app's lifespan begins,
so uvicorn, a test or Ray Serve can host it; `serve(...)` runs it with uvicorn."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MinisdError, ParameterError
from ..rng import RNG_LABELS, normalize_rng
from .a1111 import (ApiError, Img2ImgRequest, PngInfoRequest, Txt2ImgRequest, decode_image, fill_masked,
                    generation_params, generation_response, inpaint_mask, latent_upscale_modes, png_info,
                    samplers_list, schedulers_list, upscalers_list)
from .jobs import GenerationJob, GenerationWorker
from .models import ModelCatalog, UnknownModelError, loader_for
from .openai import openai_router

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 64 * 2**20


def create_app(model: str | None = "demo", models_dir: str | None = None, *, device: str | None = None,
               dtype=None, taesd: str | None = None, api_auth: str | None = None, max_size: int = 2048,
               max_batch: int = 16,
               max_body_bytes: int = DEFAULT_MAX_BODY, keep_loaded: int = 1, catalog: ModelCatalog | None = None,
               worker: GenerationWorker | None = None) -> FastAPI:
    """The server as an ASGI app. The startup model is loaded here (a bad one fails before serving);
    `catalog`/`worker` may be passed in to share them with another host."""
    catalog = catalog or ModelCatalog(model, models_dir, loader=loader_for(device, dtype, taesd),
                                      keep_loaded=keep_loaded)
    catalog.get()
    worker = worker or GenerationWorker(catalog)
    options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_vae": "Automatic",
                               "eta_ancestral": 1.0, "eta_ddim": 0.0, "live_previews_enable": True,
                               "show_progress_type": "Approx cheap", "show_progress_every_n_steps": 1,
                               # minisd's default noise is CPU (A1111's is "GPU"; both reproducible here)
                               "randn_source": "CPU", "eta_noise_seed_delta": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop, 30)

    app = FastAPI(title="minisd", description="AUTOMATIC1111-compatible API of minisd", lifespan=lifespan)
    app.state.catalog, app.state.worker, app.state.options = catalog, worker, options
    if api_auth:
        app.add_middleware(BasicAuth, credentials=api_auth)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _error_handlers(app)

    def model_entry(name: str | None):
        if not name:
            return None
        try:
            return catalog.find(name)
        except UnknownModelError as e:
            raise ApiError(404, str(e)) from None

    async def run_job(job: GenerationJob, req) -> dict:
        try:
            result = await asyncio.wrap_future(worker.submit(job))
        except MinisdError as e:
            raise ApiError(422, str(e), type(e).__name__) from None
        return await run_in_threadpool(generation_response, result, req)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        params = generation_params(req, max_size=max_size, max_batch=max_batch,
                                   clip_skip=options["CLIP_stop_at_last_layers"],
                                   randn_source=options["randn_source"],
                                   eta_noise_seed_delta=options["eta_noise_seed_delta"])
        model = model_entry((req.override_settings or {}).get("sd_model_checkpoint"))
        return await run_job(GenerationJob(params, model=model, **_task_id(req)), req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest):
        params = generation_params(req, max_size=max_size, max_batch=max_batch,
                                   clip_skip=options["CLIP_stop_at_last_layers"],
                                   randn_source=options["randn_source"],
                                   eta_noise_seed_delta=options["eta_noise_seed_delta"])
        model = model_entry((req.override_settings or {}).get("sd_model_checkpoint"))
        if not req.init_images:
            raise ApiError(404, "Init image not found")
        if len(req.init_images) > 1:
            raise ApiError(422, "one init image per request is supported")
        init = await run_in_threadpool(decode_image, req.init_images[0], "init_images[0]")
        init = init.convert("RGB") if init.mode not in ("RGB", "RGBA") else init
        mask = None
        if req.mask:
            raw = await run_in_threadpool(decode_image, req.mask, "mask")
            mask = inpaint_mask(raw, bool(req.inpainting_mask_invert))
            if req.inpainting_fill == 0:
                # "fill": the hole takes the surrounding colours before encoding (the mask at the image's size).
                init = await run_in_threadpool(fill_masked, init, mask.resize(init.size, Image.Resampling.LANCZOS))
        return await run_job(GenerationJob(params, init, mask, model=model, **_task_id(req)), req)

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return samplers_list()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return schedulers_list()

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return upscalers_list()

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_modes():
        return latent_upscale_modes()

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [entry.a1111() for entry in catalog.entries()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # the catalog lists --models-dir afresh on every request

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []

    @app.get("/sdapi/v1/options")
    def get_options():
        current = catalog.current
        loaded = catalog.loaded(current)
        # minisd_image_size: the current model's own resolution (the page's default size), when it is loaded.
        return {**options, "sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256,
                "minisd_image_size": loaded.config.image_size if loaded is not None else None}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        changes = dict(body)
        if "CLIP_stop_at_last_layers" in changes:
            value = changes["CLIP_stop_at_last_layers"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
                raise ApiError(422, f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {value!r}")
        if "randn_source" in changes:
            try:
                changes["randn_source"] = RNG_LABELS[normalize_rng(str(changes["randn_source"]))]
            except ParameterError as e:
                raise ApiError(422, f"randn_source: {e}") from None
        if "eta_noise_seed_delta" in changes:
            value = changes["eta_noise_seed_delta"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(422, f"eta_noise_seed_delta must be a non-negative integer, got {value!r}")
        name = changes.pop("sd_model_checkpoint", None)
        if name is not None:
            entry = model_entry(str(name))
            try:
                await asyncio.wrap_future(worker.switch_model(entry))
            except MinisdError as e:
                raise ApiError(422, str(e), type(e).__name__) from None
        for key in ("sd_checkpoint_hash",):
            changes.pop(key, None)
        options.update(changes)
        return None

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return worker.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.skip()
        return {}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info")
    def pnginfo(req: PngInfoRequest):
        if not req.image:
            raise ApiError(404, "Request body is empty")
        return png_info(decode_image(req.image, "image"))

    app.include_router(openai_router(worker, catalog, max_size, max_batch))

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _task_id(req) -> dict:
    return {"task_id": req.force_task_id} if req.force_task_id else {}


# ---- errors in A1111's shape ---------------------------------------------------------------------------

def _error(status: int, error: str, detail: Any, errors: Any = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "detail": detail, "body": "",
                                                     "errors": str(detail) if errors is None else errors})


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.error, e.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        problems = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                    for err in e.errors()]
        text = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']}" for p in problems)
        return _error(422, "RequestValidationError", text or "invalid request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "HTTPException", e.detail)

    @app.exception_handler(MinisdError)
    async def minisd_error(request: Request, e: MinisdError):
        return _error(422, type(e).__name__, str(e))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return _error(500, type(e).__name__, str(e))


# ---- ASGI middleware (plain ASGI, so a long generation is never cancelled by a wrapper task) ---------------

class BodyLimit:
    """413 for request bodies over `max_bytes` (by Content-Length, and counted for chunked bodies)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, {"error": "PayloadTooLarge", "body": "", "errors": "",
                                                "detail": f"request body over {self.max_bytes} bytes"})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, f"request body over {self.max_bytes} bytes", "PayloadTooLarge")
            return message
        await self.app(scope, limited_receive, send)


class BasicAuth:
    """HTTP basic auth for every route (`user:pass[,user2:pass2]`, as A1111's --api-auth); a Bearer token equal
    to a password or to `user:pass` is accepted too (OpenAI-style clients send one)."""

    def __init__(self, app, credentials: str):
        self.app = app
        self.pairs = [c.strip() for c in credentials.split(",") if ":" in c]

    def _allowed(self, header: str) -> bool:
        kind, _, value = header.partition(" ")
        if kind.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return any(secrets.compare_digest(value, pair) for pair in self.pairs)
        if kind.lower() == "bearer":
            return any(secrets.compare_digest(value, pair) or secrets.compare_digest(value, pair.split(":", 1)[1])
                       for pair in self.pairs)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self._allowed(header):
                return await _send_json(send, 401, {"error": "Unauthorized", "detail": "Incorrect username or "
                                                    "password", "body": "", "errors": ""},
                                        [(b"www-authenticate", b'Basic realm="minisd"')])
        await self.app(scope, receive, send)


async def _send_json(send, status: int, content: dict, headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """The app served by uvicorn on a background thread (tests, benchmarks, notebooks): `with
    ServerThread(app) as server: server.url`. Port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "ServerThread":
        import time
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()
