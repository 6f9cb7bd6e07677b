"""FastAPI dependencies: what a route may ask for, each resolved from the app's state."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from cleandift.settings import Settings

from ..metrics import ApiMetrics
from ..queue.producer import JobProducer
from .decoding import MemoryBudget
from .problems import Problem


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_producer(request: Request) -> JobProducer:
    producer: JobProducer = request.app.state.producer
    return producer


def get_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


def get_decode_budget(request: Request) -> MemoryBudget:
    budget: MemoryBudget = request.app.state.decode_budget
    return budget


SettingsDep = Annotated[Settings, Depends(get_settings)]
ProducerDep = Annotated[JobProducer, Depends(get_producer)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
BudgetDep = Annotated[MemoryBudget, Depends(get_decode_budget)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Bearer token or X-API-Key, only when a key is configured."""
    if not settings.api_key:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise Problem(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                      headers={"WWW-Authenticate": "Bearer"})


Protected = [Depends(require_api_key)]
