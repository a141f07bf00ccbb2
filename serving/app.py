"""FastAPI app factory: POST /predict on the registered champion, plus health, model and metrics."""

from __future__ import annotations

import json
import logging
import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from pipeline import faces as face_crop
from pipeline import labels
from pipeline.config import Settings
from serving import schemas
from serving.batcher import Batcher
from serving.decode import DecodePool
from serving.guard import Guard
from serving.metrics import Metrics, MetricsMiddleware
from serving.store import Loaded, ModelStore, NoModel

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# `faceopt serve --workers N` hands its settings to uvicorn's worker processes through this variable.
SETTINGS_ENV = "FACEOPT_SERVE_SETTINGS"
ERRORS = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 403, 408, 413, 415, 422, 431, 503)
}


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
        yield
        await app.state.batcher.stop()
        app.state.decode.close()

    app = FastAPI(
        title="faceopt",
        description="Age bracket, ethnicity and gender from face photos, by the registered champion.",
        lifespan=lifespan,
        # Starlette's defaults are 1,000 parts of either kind; the parser stops at these instead.
        form_limits={"max_files": settings.max_files, "max_fields": 8, "max_part_size": 64 * 1024},
    )
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(Guard, settings=settings)  # the outermost: before anything is parsed
    _routes(app)
    return app


def app_from_env() -> FastAPI:
    """The app in each of uvicorn's worker processes, with the settings `faceopt serve` passed on."""
    return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))


# Dependencies and light routes are `async def`: FastAPI runs a plain `def` in the thread pool,
# and those hops (a dozen per request) cost more than the network's forward pass.
async def get_store(request: Request) -> ModelStore:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def current_model(store: Annotated[ModelStore, Depends(get_store)]) -> Loaded:
    try:
        return store.current
    except NoModel as e:
        raise HTTPException(503, str(e)) from e


StoreDep = Annotated[ModelStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelDep = Annotated[Loaded, Depends(current_model)]


def _routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=schemas.Status)
    async def health() -> schemas.Status:
        return schemas.Status(status="ok")

    @app.get("/ready", response_model=schemas.Status, responses=ERRORS)
    async def ready(store: StoreDep):
        if store.ready:
            return schemas.Status(status="ready")
        detail = store.last_error or "no champion registered: run make train-best"
        return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)

    @app.get("/model", response_model=schemas.ModelInfo, responses=ERRORS)
    async def model_info(model: ModelDep) -> schemas.ModelInfo:
        metrics = {k: float(v) for k, v in model.tags.items() if k.startswith("test_")}
        return schemas.ModelInfo(
            name=model.name,
            version=model.version,
            alias=model.alias,
            run_id=model.run_id,
            test_metrics=metrics,
            labels=model.classes,
            age_edges=model.model.meta["age_edges"],
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/reload", response_model=schemas.ModelRef, responses=ERRORS)
    async def reload(
        store: StoreDep,
        settings: SettingsDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> schemas.ModelRef:
        """Load the alias's current version and swap it in; on failure the old one keeps serving.
        Disabled unless FACEOPT_RELOAD_TOKEN is set; then it needs that token as a bearer token."""
        if settings.reload_token is None:
            raise HTTPException(
                403,
                "POST /reload is disabled: start the service with FACEOPT_RELOAD_TOKEN=<secret> "
                "and send 'Authorization: Bearer <secret>'",
            )
        if not _bearer_matches(authorization, settings.reload_token.get_secret_value()):
            raise HTTPException(
                401,
                "reload needs 'Authorization: Bearer <FACEOPT_RELOAD_TOKEN>'",
                headers={"WWW-Authenticate": 'Bearer realm="faceopt"'},
            )
        try:
            loaded = await run_in_threadpool(store.reload)
        except NoModel as e:
            serving = f"; still serving version {store.current.version}" if store.ready else ""
            raise HTTPException(503, f"{e}{serving}") from e
        return schemas.ModelRef(name=loaded.name, version=loaded.version, alias=loaded.alias)

    @app.post("/predict", response_model=schemas.PredictResponse, responses=ERRORS)
    async def predict(
        request: Request,
        model: ModelDep,
        settings: SettingsDep,
        files: Annotated[list[UploadFile] | None, File(description="one or more images")] = None,
        file: Annotated[UploadFile | None, File(description="a single image")] = None,
    ) -> schemas.PredictResponse:
        """Face images (JPEG, PNG, WebP, BMP, GIF) -> age bracket, ethnicity and gender."""
        uploads = [*(files or []), *([file] if file else [])]
        if not uploads:
            raise HTTPException(
                422, "no image: send one or more files in the multipart field 'files'"
            )
        names = [u.filename or f"file{i}" for i, u in enumerate(uploads)]
        pool: DecodePool = request.app.state.decode
        faces = [
            await pool.face(u.file, name, settings) for u, name in zip(uploads, names, strict=True)
        ]
        found = [i for i, face in enumerate(faces) if face.answered]
        per_face: list[dict[str, np.ndarray] | None] = [None] * len(faces)  # None: no answer
        if found:
            # This request's faces in one pass, shared with whatever other requests wait.
            probs = await request.app.state.batcher.probabilities(
                model, np.stack([faces[i].pixels for i in found])
            )
            for row, i in enumerate(found):
                per_face[i] = {head: p[row] for head, p in probs.items()}
        request.app.state.metrics.images.observe(len(faces))
        return schemas.PredictResponse(
            model=schemas.ModelRef(name=model.name, version=model.version, alias=model.alias),
            predictions=[
                _prediction(name, face, face_probs, model.classes)
                for name, face, face_probs in zip(names, faces, per_face, strict=True)
            ],
        )


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


def _bearer_matches(authorization: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any case, compared in constant time on
    bytes (a header is latin-1 on the wire; the token may be any text)."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(given.strip().encode("latin-1"), token.encode("utf-8"))


def _box(values: tuple[int, int, int, int], angle: float = 0.0) -> schemas.FaceBox:
    x, y, w, h = values
    return schemas.FaceBox(x=x, y=y, width=w, height=h, angle=round(angle, 2))


def _prediction(
    name: str,
    face: face_crop.Face,
    probs: dict[str, np.ndarray] | None,
    classes: dict[str, list[str]],
) -> schemas.ImagePrediction:
    heads: dict[str, schemas.HeadPrediction | None] = dict.fromkeys(labels.HEADS)  # no face
    if probs is not None:
        for head, p in probs.items():
            heads[head] = schemas.HeadPrediction(
                label=classes[head][int(p.argmax())],
                probabilities={
                    c: round(float(v), 6) for c, v in zip(classes[head], p, strict=True)
                },
            )
    return schemas.ImagePrediction(
        filename=name,
        face_detected=face.box is not None,
        face_box=_box(face.box) if face.box else None,
        crop=_box(face.crop, face.angle),
        **heads,
    )
