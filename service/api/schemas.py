"""Response bodies as pydantic models: they document the OpenAPI schema (the routes build
the bytes themselves, for speed)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cleandift.contract import MATCH_REFINE_PATCHES, ModelInfo
from cleandift.settings import Settings

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
    layout: str = Field(description="map: [C, h, w]; points: [N, C]; grid: [C, g, g]")
    features: dict[str, FeatureMap] = Field(description="By key; with dtype=int8 each KEY "
                                             "comes with KEY.scale (float32, per channel)")
    timings_ms: dict[str, float]


class MatchOut(BaseModel):
    source: list[float]
    target: list[float]
    score: float


class TargetOut(BaseModel):
    matches: list[MatchOut]
    heatmap: Heatmap | None = None


class CorrespondOut(BaseModel):
    model: str
    model_version: str
    matches: list[MatchOut] | None = Field(None, description="One target: its matches")
    heatmap: Heatmap | None = None
    results: list[TargetOut] | None = Field(None, description="Several targets: one entry each, "
                                            "in the order they were sent")
    timings_ms: dict[str, float]


class Limits(BaseModel):
    """What one request may ask for; anything beyond is refused with 413 or 422."""

    max_body_bytes: int
    max_image_pixels: int = Field(description="Width x height of an uploaded image.")
    min_size: int
    max_size: int = Field(description="Largest model input side (`size`).")
    max_points: int = Field(description="Source points of one /correspond.")
    max_matches: int
    max_targets: int = Field(description="Targets of one /correspond.")
    max_prompt_chars: int
    request_timeout_s: float = Field(description="Deadline of a request (504 after it).")
    match_refine_patches: int = Field(description="Feature patches refined per point: the "
                                      "bound on matching cost per point, whatever the "
                                      "target's pixel count.")

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(max_body_bytes=settings.max_body_bytes,
                   max_image_pixels=settings.max_image_pixels, min_size=settings.min_size,
                   max_size=settings.max_size, max_points=settings.max_points,
                   max_matches=settings.max_matches, max_targets=settings.max_targets,
                   max_prompt_chars=settings.max_prompt_chars,
                   request_timeout_s=settings.request_timeout_s,
                   match_refine_patches=MATCH_REFINE_PATCHES)


class ModelsOut(ModelInfo):
    limits: Limits


class ReadyOut(BaseModel):
    status: str
    workers: int
    model: str
    model_version: str


class HealthOut(BaseModel):
    status: str
