"""OpenAI's images API, `POST /v1/images/generations` (prompt, n, size, response_format b64_json), which several
chat front-ends speak; it runs through the same queue as the A1111 endpoints. Errors use OpenAI's shape."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..errors import ParameterError
from ..params import GenerationParams
from .a1111 import png_base64
from .jobs import GenerationJob


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # quality, style, user ... have no meaning here

    prompt: Any = None
    n: Any = 1
    size: Any = None
    response_format: Any = "b64_json"
    model: Any = None


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _size(value: Any, default: int, max_size: int) -> tuple[int, int]:
    if value in (None, "", "auto"):
        return default, default
    try:
        width, height = (int(v) for v in str(value).lower().split("x"))
    except ValueError:
        raise ParameterError(f"size must be WIDTHxHEIGHT such as '512x512', got {value!r}") from None
    if max(width, height) > max_size:
        raise ParameterError(f"size {width}x{height} is over this server's limit of {max_size} (--max-size)")
    return width, height


def openai_router(worker, catalog, max_size: int, max_batch: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/images/generations")
    async def images_generations(req: ImageGenerationRequest):
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            return openai_error(400, "prompt is required (a non-empty string)", "prompt")
        if req.response_format not in (None, "b64_json"):
            return openai_error(400, "only response_format 'b64_json' is supported", "response_format")
        if isinstance(req.n, bool) or not isinstance(req.n, int) or not 1 <= req.n <= max_batch:
            return openai_error(400, f"n must be an integer from 1 to {max_batch}", "n")
        model = None
        if isinstance(req.model, str) and req.model:
            try:
                model = catalog.find(req.model)
            except ParameterError:
                model = None  # OpenAI model names such as "dall-e-3": the current model answers
        try:
            loaded = catalog.loaded(model)  # the worker loads models; here only a loaded one's size is read
            width, height = _size(req.size, loaded.config.image_size if loaded is not None else 512, max_size)
            params = GenerationParams(prompt=req.prompt, width=width, height=height, batch_size=req.n).validated()
        except ParameterError as e:
            return openai_error(400, str(e), "size")
        job = GenerationJob(params=params, model=model)
        try:
            result = await asyncio.wrap_future(worker.submit(job))
        except ParameterError as e:
            return openai_error(400, str(e))
        data = await run_in_threadpool(lambda: [{"b64_json": png_base64(image), "revised_prompt": req.prompt}
                                                for image in result.images])
        return {"created": int(time.time()), "data": data}

    return router
