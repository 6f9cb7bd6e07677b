"""FastAPI dependencies: what a route may ask for, resolved from the app's state.

The per-process services live in one `Services` object, so a route resolves one
dependency (FastAPI's resolution costs real time per request at hundreds per second).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from cleandift.settings import Settings

from ..metrics import ApiMetrics
from ..queue.producer import JobProducer
from .decoding import MemoryBudget
from .fetch import ResultFetcher
from .problems import Problem


@dataclass
class Services:
    """Everything one API process owns: built in the app's lifespan, closed with it."""

    settings: Settings
    metrics: ApiMetrics
    budget: MemoryBudget
    producer: JobProducer
    fetcher: ResultFetcher


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_api_key(request: Request, services: ServicesDep) -> None:
    """Bearer token or X-API-Key, only when a key is configured."""
    key = services.settings.api_key
    if not key:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise Problem(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                      headers={"WWW-Authenticate": "Bearer"})


Protected = [Depends(require_api_key)]
