"""FastAPI app factory: POST /predict on the registered champion, plus health, model and metrics."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, suppress

import torch
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from pipeline.config import Settings
from serving import routes
from serving.batcher import Batcher
from serving.decode import DecodePool
from serving.guard import Guard
from serving.metrics import Metrics, MetricsMiddleware
from serving.store import ModelStore, NoModel

log = logging.getLogger(__name__)
# Text fields the multipart parser reads before the route refuses them (422), and their size:
# Starlette's defaults are 1,000 parts of either kind; the parser stops at these instead.
FORM_FIELDS, FORM_FIELD_BYTES = 8, 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One torch thread: concurrent requests already keep the cores busy (preprocessing threads
        # beside the forward pass), and intra-op threads at these batch sizes cost more in
        # hand-offs than they gain (measured: 285 vs 250 requests/s at concurrency 8, 2 cores).
        torch.set_num_threads(settings.torch_threads or 1)
        store = ModelStore(settings.tracking_uri, settings.model_name, settings.alias)
        try:
            await run_in_threadpool(store.reload)
        except NoModel as e:
            log.warning("starting without a model: %s", e)
        app.state.store = store
        app.state.batcher = Batcher(settings.max_batch)
        app.state.decode = DecodePool(settings.decode_slots)
        await app.state.batcher.start()
        watcher = asyncio.create_task(_watch(store, settings.watch_alias))
        yield
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
        await app.state.batcher.stop()
        app.state.decode.close()

    app = FastAPI(
        title="faceopt",
        description="Age bracket, ethnicity and gender from face photos, by the registered champion.",
        lifespan=lifespan,
        form_limits={
            "max_files": settings.max_files,
            "max_fields": FORM_FIELDS,
            "max_part_size": FORM_FIELD_BYTES,
        },
    )
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.openapi = _documented(app, settings)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(Guard, settings=settings)  # the outermost: before anything is parsed
    app.include_router(routes.router)
    return app


async def _watch(store: ModelStore, every: float | None) -> None:
    """Follow the registry alias every `every` seconds (FACEOPT_WATCH_ALIAS), if set."""
    while every:
        await asyncio.sleep(every)
        try:
            await run_in_threadpool(store.follow)
        except Exception:  # an unreachable registry now and then must not end the watch
            log.exception(
                "watching %s@%s failed; trying again in %s s", store.name, store.alias, every
            )


def _documented(app: FastAPI, settings: Settings):
    """FastAPI's OpenAPI document, with the upload body as the service accepts it: one or more
    non-empty image files in `files`, or one in `file`, and nothing else (FastAPI would say both
    may be missing or null)."""
    generated = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generated()
            image = {
                "type": "string",
                "format": "binary",
                "contentMediaType": "image/*",
                "minLength": 1,
            }
            document["components"]["schemas"]["Body_predict_predict_post"] = {
                "title": "Body_predict_predict_post",
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": image,
                        "maxItems": settings.max_files,
                        "description": "one or more images (JPEG, PNG, WebP, BMP or GIF)",
                    },
                    "file": image | {"description": "a single image"},
                },
                # One image at least: an empty `files` is no part at all on the wire.
                "anyOf": [
                    {"required": ["files"], "properties": {"files": {"minItems": 1}}},
                    {"required": ["file"]},
                ],
                "additionalProperties": False,
            }
            document["paths"]["/predict"]["post"]["requestBody"]["required"] = True
        return app.openapi_schema

    return openapi


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422s in the service's one error shape: `detail` is a sentence, not a list."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        message = error["msg"]
        if "Expected UploadFile" in message:
            message = "expected an image file (a part with a filename), got a text field"
        problems.append(f"{where}: {message}")
    return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """HTTP errors as the JSON error of every other refusal; the multipart parser's limits (its
    400s) become 413s that name the setting."""
    if exc.status_code == 400 and isinstance(exc.__context__, MultiPartException):
        settings: Settings = request.app.state.settings
        message = exc.__context__.message
        if message.startswith("Too many files"):
            exc = StarletteHTTPException(
                413, f"more than {settings.max_files} files (FACEOPT_MAX_FILES)"
            )
        elif message.startswith(("Too many fields", "Field exceeded", "Part exceeded")):
            exc = StarletteHTTPException(
                413, f"{message} Only image files are expected, in the fields 'files' or 'file'."
            )
        else:
            exc = StarletteHTTPException(400, f"malformed multipart body: {message}")
    return await http_exception_handler(request, exc)
