"""What travels through Redis: jobs (API -> worker) and results (worker -> API).

Images travel already decoded and resized to the model input (uint8, s x s x 3); feature
maps travel as raw little-endian fp16/fp32 bytes. Nothing is ever pickled or JSON-floated.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from cleandift.registry import announce_channel


@dataclass(frozen=True)
class Keys:
    """Every Redis key the service uses, under one prefix."""

    prefix: str = "cleandift"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        return "workers"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def model(self) -> str:
        return f"{self.prefix}:model"

    @property
    def registry_channel(self) -> str:
        return announce_channel(self.prefix)

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def replies(self, api_id: str) -> str:
        return f"{self.prefix}:replies:{api_id}"


@dataclass
class JobSpec:
    """Everything a worker needs to run one request, except the pixels."""

    kind: str  # "features" | "correspond"
    size: int
    layers: list[str]
    sizes: list[tuple[int, int]]  # original (width, height) of each image
    prompt: str = ""
    mode: str = "clean"
    dtype: str = "float16"
    points: list[list[float]] | None = None
    max_matches: int = 100
    heatmap: bool = False  # also return the last point's similarity over the target
    deadline: float = 0.0
    reply_to: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)

    def group_key(self) -> tuple:
        """Jobs with the same key can share one forward pass."""
        return (self.size, self.prompt, self.mode)


@dataclass
class Job:
    spec: JobSpec
    images: list[np.ndarray]  # uint8 [s, s, 3]
    entry_id: str = ""  # the stream entry, set once read
    deliveries: int = 1

    def to_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {"spec": json.dumps(asdict(self.spec))}
        for i, image in enumerate(self.images):
            fields[f"img{i}"] = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
        return fields

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        raw = json.loads(fields[b"spec"])
        raw["sizes"] = [tuple(s) for s in raw["sizes"]]
        spec = JobSpec(**raw)
        shape = (spec.size, spec.size, 3)
        images = [
            np.frombuffer(fields[f"img{i}".encode()], dtype=np.uint8).reshape(shape)
            for i in range(len(spec.sizes))
        ]
        return cls(spec=spec, images=images, entry_id=entry_id)

    @property
    def pixels(self) -> int:
        return len(self.images) * self.spec.size * self.spec.size


@dataclass
class Result:
    """A job's outcome: status 200 with features or matches, or an error status."""

    job_id: str
    status: int = 200
    error: str = ""
    model: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # key -> {shape, dtype}
    matches: list[dict] | None = None
    heatmap: dict | None = None  # {"width", "height", "values"} at feature resolution
    data: dict[str, bytes] = field(default_factory=dict)  # key -> raw bytes

    def to_fields(self) -> dict[str, bytes | str]:
        meta = asdict(self)
        meta.pop("data")
        fields: dict[str, bytes | str] = {"meta": json.dumps(meta)}
        fields.update({f"layer:{k}": v for k, v in self.data.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Result:
        meta = json.loads(fields[b"meta"])
        data = {
            k.decode()[len("layer:"):]: v for k, v in fields.items() if k.startswith(b"layer:")
        }
        return cls(**meta, data=data)

    def array(self, key: str) -> np.ndarray:
        info = self.layers[key]
        dtype = np.dtype(info["dtype"]).newbyteorder("<")
        return np.frombuffer(self.data[key], dtype=dtype).reshape(info["shape"])
