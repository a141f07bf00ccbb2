"""The service's routes: the page, health and readiness, model info, metrics, reload, predict."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings
from pipeline.data import faces as face_crop
from pipeline.data import labels
from serving import schemas
from serving.decode import DecodePool
from serving.store import Loaded, ModelStore, NoModel

STATIC = Path(__file__).parent / "static"
ERRORS = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 403, 408, 413, 415, 422, 431, 503)
}
router = APIRouter()


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


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/health", response_model=schemas.Status)
async def health() -> schemas.Status:
    return schemas.Status(status="ok")


@router.get("/ready", response_model=schemas.Status, responses=ERRORS)
async def ready(store: StoreDep):
    if store.ready:
        return schemas.Status(status="ready")
    detail = store.last_error or "no champion registered: run make train-best"
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)


@router.get("/model", response_model=schemas.ModelInfo, responses=ERRORS)
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
        input=model.model.spec.to_meta(),
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.post("/reload", response_model=schemas.ModelRef, responses=ERRORS)
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


@router.post("/predict", response_model=schemas.PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile] | None, File(description="one or more images")] = None,
    file: Annotated[UploadFile | None, File(description="a single image")] = None,
) -> schemas.PredictResponse:
    """Face images (JPEG, PNG, WebP, BMP, GIF) -> age bracket, ethnicity and gender."""
    uploads = [*(files or []), *([file] if file else [])]
    unexpected = sorted(set((await request.form()).keys()) - {"files", "file"})  # parsed once
    if unexpected:
        raise HTTPException(
            422,
            f"unexpected form fields {unexpected}: send images in the multipart field 'files' "
            "(or one in 'file'), and nothing else",
        )
    if not uploads:
        raise HTTPException(422, "no image: send one or more files in the multipart field 'files'")
    names = [u.filename or f"file{i}" for i, u in enumerate(uploads)]
    pool: DecodePool = request.app.state.decode
    faces = [
        await pool.face(u.file, name, settings, model.takes_chips)
        for u, name in zip(uploads, names, strict=True)
    ]
    found = [i for i, face in enumerate(faces) if face.answered]
    per_face: list[dict[str, np.ndarray] | None] = [None] * len(faces)  # None: no answer
    if found:
        # This request's faces in one pass, shared with whatever other requests wait.
        probs = await request.app.state.batcher.probabilities(
            model, np.stack([model.model_input(faces[i]) for i in found])
        )
        for row, i in enumerate(found):
            per_face[i] = {head: p[row] for head, p in probs.items()}
    metrics = request.app.state.metrics
    metrics.images.observe(len(faces))
    for face_probs in per_face:
        metrics.observe(model.version, face_probs, model.classes)
    return schemas.PredictResponse(
        model=schemas.ModelRef(name=model.name, version=model.version, alias=model.alias),
        predictions=[
            _prediction(name, face, face_probs, model.classes)
            for name, face, face_probs in zip(names, faces, per_face, strict=True)
        ],
    )


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
