"""What travels through Redis between the API and the workers, typed and versioned.

Jobs (API -> worker) carry a validated `JobSpec` and each image, either as the upload
itself (v4: the encoded bytes whose header the API checked; the worker decodes them) or as
the model-sized pixels (uint8, s x s x 3; what older workers read); results (worker ->
API) carry raw little-endian feature bytes. Nothing is pickled and no float travels as
JSON text. No torch here: the API imports this module.

Versions: every job and result names its format version (`v`). Readers accept the
previous versions and the current one, so API and worker pods can roll in any order; a
job of a version this worker cannot read is answered with an error (503: a newer worker
will read it), never dropped. A job is written in the oldest version that can express
it, so older workers keep serving every request they understand during a rollout (the
API sends uploads only once every live worker reads v4). Within
a version, fields a reader does not know are ignored.

v1: the first format (no `v` field; `size` and `sizes`). v2: `input_size`,
`image_sizes`. v3: descriptors at points and pooled grids on /features, bfloat16 and
int8 outputs, several targets on /correspond, content hashes for the feature cache.
v4: images as uploaded (`enc0`, `enc1`, ...) instead of decoded pixels; `content` hashes
the upload's bytes (see docs/scale.md).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cleandift.contract import ModelInfo
from cleandift.dtypes import ITEMSIZE, OutputName

PROTOCOL_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
UPLOADS_VERSION = 4  # the first version whose jobs may carry uploads, not pixels
DTYPES_SINCE_V3 = ("bfloat16", "int8")  # answer dtypes a v2 reader does not know
CLIENT_CLOSED = 499  # the status of a job whose client went away (nginx's "client closed")
# RFC 9457 problems, as the API and a worker's own port answer them.
PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://cleandift.dev/problems/"


Kind = Literal["features", "correspond"]
Mode = Literal["clean", "dift"]
OutputDtype = OutputName
Fields = dict[bytes, bytes]


class UnreadableJob(ValueError):
    """A stream entry this worker cannot run; `envelope` holds what is needed to answer.

    A format version from the future is a rollout in progress (503: retry later, a newer
    worker will read it); a malformed entry is a bug (500)."""

    def __init__(self, message: str, envelope: dict[str, Any], status: int = 500) -> None:
        super().__init__(message)
        self.envelope, self.status = envelope, status


class JobSpec(BaseModel):
    """Everything a worker needs to run one request, except the pixels."""

    model_config = ConfigDict(extra="ignore")

    kind: Kind
    input_size: int = Field(gt=0, description="Model input side in px (images are s x s).")
    layers: list[str]
    image_sizes: list[tuple[int, int]] = Field(description="Original (width, height) of "
                                               "each image, for pixel coordinates.")
    prompt: str = ""
    mode: Mode = "clean"
    dtype: OutputDtype = "float16"
    points: list[tuple[float, float]] | None = None  # correspond: source; features: where to read
    grid: int | None = None  # features: pool each map to grid x grid
    # A hash of each image (its pixels before v4, its upload from v4): the answer's ETag;
    # the cache and DIFT's seed use the pixels' hash (the API's before v4, the worker's).
    content: list[str] = Field(default_factory=list)
    max_matches: int = 100
    heatmap: bool = False  # also return the last point's similarity over the target
    deadline: float = 0.0
    reply_to: str = ""
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = Field(default_factory=time.time)
    # Observability, ignored by readers that predate them: the request's id for log lines
    # and its W3C trace context (empty while tracing is off).
    request_id: str = ""
    trace: dict[str, str] = Field(default_factory=dict)

    def group_key(self) -> tuple[int, str, str]:
        """Jobs with the same key can share one forward pass."""
        return (self.input_size, self.prompt, self.mode)

    def minimum_version(self) -> int:
        """The oldest format that expresses this job (older workers can run it)."""
        needs_v3 = (self.grid is not None or self.content
                    or self.dtype in DTYPES_SINCE_V3
                    or (self.kind == "features" and self.points is not None)
                    or len(self.image_sizes) > (2 if self.kind == "correspond" else 1))
        return 3 if needs_v3 else 2


def _spec_from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named the input side `size` and the original sizes `sizes`."""
    raw = dict(raw)
    raw["input_size"] = raw.pop("size")
    raw["image_sizes"] = raw.pop("sizes")
    return raw


Entry = tuple[int, str]  # (partition, stream entry id)


@dataclass
class Job:
    spec: JobSpec
    images: list[np.ndarray]  # uint8 [s, s, 3]; empty until a worker decodes `uploads`
    entry_id: str = ""  # the stream entry, set once read
    deliveries: int = 1
    partition: int = 0  # the stream it was read from (a sharded queue: docs/scale.md)
    uploads: list[bytes] = field(default_factory=list)  # v4: the images as uploaded
    # A hash of each image's model-sized pixels: DIFT's noise seed (set where decoded).
    digests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images and not self.digests:  # pixels hashed where they were decoded
            self.digests = list(self.spec.content)

    @property
    def entry(self) -> Entry:
        """Where it sits: entry ids are unique within one stream only."""
        return self.partition, self.entry_id

    def minimum_version(self) -> int:
        """The oldest format that expresses this job (older workers can run it)."""
        return UPLOADS_VERSION if self.uploads else self.spec.minimum_version()

    def to_fields(self, version: int | None = None) -> dict[str, bytes | str | memoryview]:
        version = version or self.minimum_version()
        spec = self.spec.model_dump(mode="json")
        if version == 1:
            spec["size"], spec["sizes"] = spec.pop("input_size"), spec.pop("image_sizes")
        fields: dict[str, bytes | str | memoryview] = {"v": str(version), "spec": json.dumps(spec)}
        if self.uploads:
            fields.update({f"enc{i}": data for i, data in enumerate(self.uploads)})
        for i, image in enumerate(self.images):  # the pixels' own memory: Redis' client
            fields[f"img{i}"] = np.ascontiguousarray(image, dtype=np.uint8).data.cast("B")
        return fields

    @classmethod
    def from_fields(cls, entry_id: str, fields: Fields,
                    readable: tuple[int, ...] = READABLE_VERSIONS) -> Job:
        """Raises UnreadableJob (with what is needed to answer) for any bad entry."""
        envelope = _envelope(fields)
        version = _version(fields)
        if version not in readable:
            raise UnreadableJob(f"job format v{version} is not readable by this worker "
                                f"(it reads v{min(readable)}-v{max(readable)})", envelope,
                                status=503)
        try:
            raw = json.loads(fields[b"spec"])
            spec = JobSpec.model_validate(_spec_from_v1(raw) if version == 1 else raw)
            count = len(spec.image_sizes)
            if version >= UPLOADS_VERSION and b"enc0" in fields:
                uploads = [bytes(fields[f"enc{i}".encode()]) for i in range(count)]
                return cls(spec=spec, images=[], entry_id=entry_id, uploads=uploads)
            shape = (spec.input_size, spec.input_size, 3)
            images = [np.frombuffer(fields[f"img{i}".encode()], dtype=np.uint8).reshape(shape)
                      for i in range(count)]
        except (KeyError, ValueError, TypeError) as exc:
            raise UnreadableJob(f"malformed job: {exc}", envelope) from exc
        return cls(spec=spec, images=images, entry_id=entry_id)

    @property
    def image_bytes(self) -> int:
        """What its images put in the queue."""
        return sum(map(len, self.uploads)) + sum(image.nbytes for image in self.images)

    @property
    def pixels(self) -> int:
        return len(self.spec.image_sizes) * self.spec.input_size * self.spec.input_size


def _version(fields: Fields) -> int:
    """The format version of an entry; version 1 had no `v` field."""
    try:
        return int(fields.get(b"v", b"1"))
    except ValueError:
        return -1


def _envelope(fields: Fields) -> dict[str, Any]:
    """The job id and reply channel of an entry, read leniently to answer even bad jobs."""
    try:
        raw = json.loads(fields.get(b"spec", b"{}"))
        return {"id": str(raw.get("id", "")), "reply_to": str(raw.get("reply_to", ""))}
    except (ValueError, AttributeError):
        return {"id": "", "reply_to": ""}


class LayerMeta(BaseModel):
    shape: list[int]
    dtype: str


class Heatmap(BaseModel):
    width: int
    height: int
    values: list[float]  # row-major cosine similarities, height x width


class TargetMatches(BaseModel):
    matches: list[dict[str, Any]]
    heatmap: Heatmap | None = None


class ResultMeta(BaseModel):
    """A job's outcome without its bytes: status 200 with features or matches, or an error."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    status: int = 200
    error: str = ""
    model: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = Field(default_factory=dict)
    layers: dict[str, LayerMeta] = Field(default_factory=dict)
    matches: list[dict[str, Any]] | None = None
    heatmap: Heatmap | None = None
    targets: list[TargetMatches] | None = None  # correspond with several targets, in order
    layout: Literal["map", "points", "grid"] = "map"  # features: [C, h, w], [N, C], [C, g, g]
    cached: bool = False  # answered from the feature cache (no forward pass)
    # Large results stay on the worker: the API fetches `nbytes` raw bytes (every layer,
    # concatenated in the order of `layers`) from `location` with `token`, in one hop.
    location: str = ""
    token: str = ""
    nbytes: int = 0

    def minimum_version(self) -> int:
        """The oldest format whose readers understand this result (see the module doc)."""
        needs_v3 = (self.location or self.targets is not None or self.layout != "map"
                    or any(info.dtype not in ("float16", "float32")
                           for info in self.layers.values()))
        return 3 if needs_v3 else 2

    def layer_sizes(self) -> list[int]:
        """Byte count of each layer, in order (what `location` serves, concatenated)."""
        return [math.prod(info.shape) * ITEMSIZE[info.dtype] for info in self.layers.values()]


@dataclass
class Result:
    meta: ResultMeta
    data: dict[str, bytes] = field(default_factory=dict)  # key -> raw bytes (inline)
    # The worker's side: every layer concatenated, as computed; it travels inline (as
    # `data`) or stays on the worker for the API to fetch (`meta.location`).
    body: memoryview | None = None

    def layer_bytes(self) -> dict[str, bytes | memoryview]:
        """Each layer's bytes: `data` as it is, or views cut from `body` (no copy, and the
        result is left as it was: encoding it twice gives the same fields)."""
        if self.body is None:
            return dict(self.data)
        views: dict[str, bytes | memoryview] = {}
        offset = 0
        for key, size in zip(self.meta.layers, self.meta.layer_sizes()):
            views[key] = self.body[offset:offset + size]
            offset += size
        return views

    def to_fields(self, version: int | None = None) -> dict[str, bytes | str]:
        """The Redis hash of this result (the layers inline)."""
        version = version or self.meta.minimum_version()
        fields: dict[str, bytes | str] = {"v": str(version),
                                          "meta": self.meta.model_dump_json()}
        fields.update({f"layer:{k}": bytes(v) for k, v in self.layer_bytes().items()})
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> Result:
        version = _version(fields)
        if version not in READABLE_VERSIONS:
            raise ValueError(f"result format v{version} is not readable by this API")
        meta = ResultMeta.model_validate_json(fields[b"meta"])
        data = {k.decode()[len("layer:"):]: v for k, v in fields.items()
                if k.startswith(b"layer:")}
        return cls(meta=meta, data=data)

    def array(self, key: str) -> np.ndarray:
        """One layer as an array over the result's bytes (read-only, no copy)."""
        info = self.meta.layers[key]
        if info.dtype == "bfloat16":  # numpy has no such type
            raise ValueError(f"{key} is bfloat16: read its bytes (layer_bytes) with torch")
        dtype = np.dtype(info.dtype).newbyteorder("<")
        return np.frombuffer(self.layer_bytes()[key], dtype=dtype).reshape(info.shape)


def failure(job_id: str, status: int, message: str) -> Result:
    return Result(ResultMeta(job_id=job_id, status=status, error=message))


class Heartbeat(BaseModel):
    """A worker's periodic sign of life, with what it serves."""

    model_config = ConfigDict(extra="ignore")

    id: str
    pid: int
    host: str
    model: str
    version: str
    device: str
    started_at: float
    protocols: list[int] = Field(default_factory=lambda: list(READABLE_VERSIONS))
    metrics: str = ""  # the worker's Prometheus text


__all__ = ["Heartbeat", "Job", "JobSpec", "ModelInfo", "Result", "ResultMeta",
           "UnreadableJob", "failure"]
