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
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipeline import faces as face_crop
from pipeline import labels
from pipeline.config import Settings
from serving import schemas
from serving.batcher import Batcher
from serving.metrics import Metrics, MetricsMiddleware
from serving.store import Loaded, ModelStore, NoModel

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# `faceopt serve --workers N` hands its settings to uvicorn's worker processes through this variable.
SETTINGS_ENV = "FACEOPT_SERVE_SETTINGS"
ERRORS = {code: {"model": schemas.ErrorResponse} for code in (401, 413, 415, 422, 503)}


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
        await app.state.batcher.start()
        yield
        await app.state.batcher.stop()

    app = FastAPI(
        title="faceopt",
        description="Age bracket, ethnicity and gender from face photos, by the registered champion.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
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
        """Load the alias's current version and swap it in; on failure the old one keeps serving."""
        if settings.reload_token:
            given = (authorization or "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given, settings.reload_token):
                raise HTTPException(
                    401, "reload needs 'Authorization: Bearer <FACEOPT_RELOAD_TOKEN>'"
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
        if len(uploads) > settings.max_files:
            raise HTTPException(413, f"{len(uploads)} files, the limit is {settings.max_files}")
        raws = [await _read_limited(u, settings.max_file_bytes) for u in uploads]
        names = [u.filename or f"file{i}" for i, u in enumerate(uploads)]
        faces = await run_in_threadpool(_faces, raws, names, settings)
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


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    name = upload.filename or "upload"
    raw = await upload.read(limit + 1)  # one byte past the limit is enough to know
    if len(raw) > limit:
        raise HTTPException(413, f"{name}: larger than the limit of {limit} bytes")
    if not raw:
        raise HTTPException(422, f"{name}: empty file")
    return raw


def _faces(raws: list[bytes], names: list[str], settings: Settings) -> list[face_crop.Face]:
    faces = []
    for raw, name in zip(raws, names, strict=True):
        try:
            faces.append(face_crop.face_from_upload(raw, settings.max_pixels, settings.min_face))
        except face_crop.ImageTooLarge as e:
            raise HTTPException(413, f"{name}: {e}") from e
        except face_crop.ImageError as e:
            raise HTTPException(
                415, f"{name}: {e}; expected a JPEG, PNG, WebP, BMP or GIF image"
            ) from e
    return faces


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
