"""The cache's keys, its in-process memory tier, and `FeatureCache`, which asks the
tiers in order (the package docstring says what the cache is)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch

from cleandift.contract import ModelInfo

from ..messages import Job, JobSpec
from ..queue.errors import QueueUnavailable


class Computing(Protocol):
    """What of a model decides the bytes of its maps besides the job: its weights (name
    and version), the dtype it computes in and the kind of device (an Extractor)."""

    info: ModelInfo
    dtype: torch.dtype
    device: torch.device


def image_keys(spec: JobSpec, model: Computing, digests: list[str] | None = None
               ) -> list[str] | None:
    """One key per image of the job; None when no content hashes are known. `digests`:
    the hashes of the pixels this worker decoded (job format v4), else the API's
    (`spec.content`); either way the pixels the model sees. The key holds every input that
    changes a map's bytes (docs/cache.md): workers computing in float32 and in bfloat16
    share the Redis tier, and must not answer each other."""
    contents = spec.content if digests is None else digests
    if len(contents) != len(spec.image_sizes):
        return None
    prompt = hashlib.sha256(spec.prompt.encode()).hexdigest()[:16]
    numerics = f"{str(model.dtype).removeprefix('torch.')}@{model.device.type}"
    return [f"{version_prefix(model.info)}{content}|{spec.input_size}|{spec.mode}|{prompt}|"
            f"{numerics}" for content in contents]


def version_prefix(info: ModelInfo) -> str:
    return f"{info.name}|{info.version}|"


class Tier(Protocol):
    def get(self, keys: Sequence[str]) -> list[torch.Tensor | None]: ...
    def put(self, entries: dict[str, torch.Tensor]) -> None: ...
    def invalidate(self, prefix: str) -> int: ...


class MemoryTier:
    """A bytes-bounded LRU of host tensors, in this process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        with self._lock:
            found = []
            for key in keys:
                tensor = self._entries.get(key)
                if tensor is not None:
                    self._entries.move_to_end(key)
                found.append(tensor)
            return found

    def put(self, entries: dict[str, torch.Tensor]) -> None:
        with self._lock:
            for key, tensor in entries.items():
                size = _nbytes(tensor)
                if size > self.max_bytes:
                    continue
                old = self._entries.pop(key, None)
                self.used += size - (_nbytes(old) if old is not None else 0)
                self._entries[key] = tensor
            while self.used > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.used -= _nbytes(evicted)

    def invalidate(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._entries if k.startswith(prefix)]
            for key in doomed:
                self.used -= _nbytes(self._entries.pop(key))
            return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FeatureCache:
    """Memory first, then the shared tier (a hit there is kept in memory too)."""

    def __init__(self, memory: MemoryTier | None, shared: Tier | None) -> None:
        named = [(n, t) for n, t in (("memory", memory), ("shared", shared)) if t is not None]
        self.names = [n for n, _ in named]
        self.tiers: list[Tier] = [t for _, t in named]
        self.memory, self.shared = memory, shared

    def get(self, keys: Sequence[str], layers: Sequence[str]
            ) -> tuple[list[dict[str, torch.Tensor]] | None, str]:
        """(The maps of every image for every layer, or None: a miss, compute them all;
        where they came from: "memory", "shared" or "miss")."""
        wanted = [f"{key}|{layer}" for key in keys for layer in layers]
        found: dict[str, torch.Tensor] = {}
        for index, tier in enumerate(self.tiers):
            missing = [k for k in wanted if k not in found]
            try:
                got = dict(zip(missing, tier.get(missing)))
            except QueueUnavailable:  # the shared tier is down: a miss, not a failure
                continue
            hit = {k: v for k, v in got.items() if v is not None}
            if index > 0 and hit:
                self.tiers[0].put(hit)  # promote shared hits
            found.update(hit)
            if len(found) == len(wanted):
                where = self.names[index]
                return [{layer: found[f"{key}|{layer}"] for layer in layers} for key in keys], where
        return None, "miss"

    def put(self, keys: Sequence[str], maps: Sequence[dict[str, torch.Tensor]]) -> None:
        entries = {f"{key}|{layer}": tensor.detach().to("cpu", copy=True)
                   for key, per_layer in zip(keys, maps) for layer, tensor in per_layer.items()}
        for tier in self.tiers:
            with contextlib.suppress(QueueUnavailable):
                tier.put(entries)

    def lookup(self, job: Job, model: Computing
               ) -> tuple[list[dict[str, torch.Tensor]] | None, str]:
        """`get` for a job's images and layers (a miss where its images have no hashes)."""
        keys = image_keys(job.spec, model, job.digests)
        return self.get(keys, job.spec.layers) if keys else (None, "miss")

    def remember(self, job: Job, model: Computing,
                 maps: Sequence[dict[str, torch.Tensor]]) -> None:
        """Keep what a forward computed for each of a job's images."""
        keys = image_keys(job.spec, model, job.digests)
        if keys:
            self.put(keys, maps)

    def invalidate(self, info: ModelInfo) -> int:
        """Drop every entry of this model version (after a hot reload replaced it)."""
        dropped = 0
        for tier in self.tiers:
            with contextlib.suppress(QueueUnavailable):
                dropped += tier.invalidate(version_prefix(info))
        return dropped
