"""The API's side of a deployment's models: one queue producer per served model, and the
choice a request makes with `model` (form field, JSON key or query)."""

from __future__ import annotations

import asyncio

from cleandift.contract import ModelInfo, shown
from cleandift.settings import Settings

from ..fleet import fleet_of
from ..queue.partitions import Producer, make_producer
from .problems import RETRY, Problem


class ServedModels:
    """Producers by served name (None: the one unnamed model of a one-model deployment,
    whose name is whatever its workers report)."""

    def __init__(self, producers: dict[str | None, Producer], default: str | None) -> None:
        self.producers, self.default = producers, default

    @classmethod
    def from_settings(cls, settings: Settings, redis_url: str) -> ServedModels:
        fleet = fleet_of(settings)
        producers = {plan.name: make_producer(settings, redis_url, plan.name)
                     for plan in fleet.models}
        return cls(producers, fleet.default)

    @property
    def named(self) -> bool:
        return None not in self.producers

    @property
    def names(self) -> list[str]:
        return [name for name in self.producers if name is not None]

    @property
    def main(self) -> Producer:
        """The default model's producer."""
        return self.producers[self.default]

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.producers.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.producers.values()))

    async def choose(self, name: str | None) -> tuple[Producer, str | None]:
        """The producer of the named model (the default when None); 404 for a name not
        served."""
        if not name:
            return self.main, self.default
        if name in self.producers:
            return self.producers[name], name
        served = self.names
        if not self.named:  # the unnamed model answers to the name its workers report
            info = await self.main.model_info()
            if info is not None and info.name == name:
                return self.main, None
            served = [info.name] if info is not None else []
        raise Problem(404, f"no model named {shown(name)} is served here; served: "
                      f"{', '.join(served) or 'none loaded yet'}", kind="unknown-model")

    async def info(self, producer: Producer, *, fresh: bool = False) -> ModelInfo:
        model = await producer.model_info(fresh=fresh)
        if model is None:
            raise Problem(503, "no worker has loaded a model yet", kind="not-ready",
                          headers=RETRY)
        return model
