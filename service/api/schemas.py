"""Response bodies as pydantic models: they document the OpenAPI schema (the routes build
the bytes themselves, for speed)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cleandift.contract import ModelInfo
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
    exact: bool = Field(True, description="The search proved this is DIFT's argmax; false "
                        "only where the request's matching budget or deadline stopped it "
                        "first (then the best pixel found so far).")


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
    match_max_pixels: int = Field(description="Candidate target pixels one /correspond may "
                                  "evaluate proving DIFT's argmax; a search stopped by it (or "
                                  "by the deadline) answers `exact: false`.")
    max_job_cost: float = Field(description="What one request may cost a worker, in "
                                "megapixel-passes: images x m x (1 + m) x (0.5 for the VAE + "
                                "UNet passes (1, or 8 for mode=dift) x the share of the UNet "
                                "up to the deepest layer), m = (size/1000)², plus 0.001 per "
                                "point per target (cleandift/cost.py); over it: 422.")

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(max_body_bytes=settings.max_body_bytes,
                   max_image_pixels=settings.max_image_pixels, min_size=settings.min_size,
                   max_size=settings.max_size, max_points=settings.max_points,
                   max_matches=settings.max_matches, max_targets=settings.max_targets,
                   max_prompt_chars=settings.max_prompt_chars,
                   request_timeout_s=settings.request_timeout_s,
                   match_max_pixels=settings.match_max_pixels,
                   max_job_cost=settings.max_job_cost)


class ModelOut(ModelInfo):
    limits: Limits


class ModelsOut(ModelOut):
    """The default model at the top level (clients of one model keep working)."""

    @classmethod
    def of_one(cls, info: ModelInfo, settings: Settings) -> ModelsOut:
        """The body a one-model deployment of `info` answers (`cleandift info` prints it)."""
        return cls(**info.model_dump(), limits=Limits.of(settings), default_model=info.name,
                   served=[info.name], models=[info])

    default_model: str = Field(description="The model of requests that name none.")
    served: list[str] = Field(description="Every served model's name (`model` of a request).")
    models: list[ModelInfo] = Field(description="Every served model that a worker has "
                                    "loaded, each under its name.")


class ReadyOut(BaseModel):
    status: str
    workers: int
    model: str
    model_version: str
    models: dict[str, str] = Field(default_factory=dict,
                                   description="Every served model's name and version.")


class HealthOut(BaseModel):
    status: str
