"""Response models of the API (they are also its /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class HeadPrediction(BaseModel):
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="every class and its probability")


class FaceBox(BaseModel):
    x: int
    y: int
    width: int
    height: int
    angle: float = Field(0.0, description="degrees the region is turned about its centre")


class ImagePrediction(BaseModel):
    filename: str
    face_detected: bool = Field(description="false: no face found, and no labels are given")
    face_box: FaceBox | None = Field(
        description="the detected face, in the uploaded image's pixels"
    )
    crop: FaceBox = Field(
        description="the region cut and resized to 48x48 for the network, aligned on the face's "
        "landmarks as the training faces were (without a face: the centre square looked at)"
    )
    age: HeadPrediction | None = Field(description="null when no face was found")
    ethnicity: HeadPrediction | None = Field(description="null when no face was found")
    gender: HeadPrediction | None = Field(description="null when no face was found")


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[ImagePrediction]


class ModelInfo(ModelRef):
    run_id: str
    test_metrics: dict[str, float]
    labels: dict[str, list[str]]
    age_edges: list[int]
    # What the network eats: size, colour, features (pixels, descriptor, both), normalisation.
    input: dict[str, int | float | str]


class Status(BaseModel):
    status: str
    detail: str | None = None


class ErrorResponse(BaseModel):
    detail: str
