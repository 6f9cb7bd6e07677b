"""FastAPI dependencies: what a route may ask for, resolved from the app's state.

The per-process services live in one `Services` object, so a route resolves one
dependency (FastAPI's resolution costs real time per request at hundreds per second).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from cleandift.settings import Settings

from ..metrics import ApiMetrics
from ..queue.partitions import Producer
from .decoding import MemoryBudget
from .fetch import ResultFetcher
from .problems import Problem
from .served import ServedModels


@dataclass
class Services:
    """Everything one API process owns: built in the app's lifespan, closed with it."""

    settings: Settings
    metrics: ApiMetrics
    budget: MemoryBudget
    models: ServedModels
    fetcher: ResultFetcher

    @property
    def producer(self) -> Producer:
        """The default model's queue."""
        return self.models.main


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declared as security schemes, so OpenAPI (and the Authorize button of /docs) shows them;
# checked below only when a key is configured.
BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


def require_api_key(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    header: Annotated[str | None, Depends(API_KEY_HEADER)],
) -> None:
    """Bearer token or X-API-Key, only when a key is configured."""
    secret = services.settings.api_key
    key = secret.get_secret_value() if secret is not None else ""
    if not key:
        return
    given = bearer.credentials.strip() if bearer is not None else (header or "")
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise Problem(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                      headers={"WWW-Authenticate": "Bearer"})


Protected = [Depends(require_api_key)]
