"""Response bodies as pydantic models: they document the OpenAPI schema (the routes build
the bytes themselves, for speed)."""

from __future__ import annotations

from pydantic import BaseModel

from ..messages import Heatmap


class FeatureMap(BaseModel):
    shape: list[int]
    dtype: str
    data: str


class FeaturesOut(BaseModel):
    model: str
    model_version: str
    image: dict[str, int]
    input_size: int
    features: dict[str, FeatureMap]
    timings_ms: dict[str, float]


class MatchOut(BaseModel):
    source: list[float]
    target: list[float]
    score: float


class CorrespondOut(BaseModel):
    model: str
    model_version: str
    matches: list[MatchOut]
    timings_ms: dict[str, float]
    heatmap: Heatmap | None = None


class ReadyOut(BaseModel):
    status: str
    workers: int
    model: str
    model_version: str


class HealthOut(BaseModel):
    status: str
