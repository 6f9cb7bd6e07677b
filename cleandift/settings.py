"""The one configuration object: every tunable, from `CLEANDIFT_*` env vars or CLI flags.

Values are checked when the object is built (types, ranges, and the rules that tie fields
together), so a bad deployment fails at start-up with the variable's name, not later.
The core library never reads it: processes build one and pass the values they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .dtypes import FloatName, canonical_dtype
from .method import SIZE_MULTIPLE

DEVICE_PATTERN = r"^(cpu|mps|cuda(:\d+)?)$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"  # a served name: URLs, Redis keys
DEVICES_PATTERN = r"^(all|cpu|\d+(,\d+)*)$"
CPU_JOB_COST = 6.0  # megapixel-passes (cleandift/cost.py) one request may cost on CPU
GPU_JOB_COST = 300.0  # the same on a GPU (compose and k8s set it too)
GATE_MARGIN = 0.02  # absolute warp PCK@0.10 a new version may lose against the live one


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "cleandift"


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    # Empty variables count as unset (compose and k8s often pass VAR="" for "default").
    # populate_by_name: Settings(worker_port=0) must mean it even where a field has env
    # aliases (without it the keyword was dropped, and every test worker took port 9001).
    model_config = SettingsConfigDict(
        env_prefix="CLEANDIFT_", extra="ignore", env_ignore_empty=True, validate_default=True,
        populate_by_name=True,
    )

    # Model
    model: str | None = Field(
        None, description="Model spec: diffusers folder, hub id, registry DIR/NAME[/VERSION] "
        "or a built-in small model (`demo`, SD2.1-shaped; `demo15`, SD1.5-shaped); `demo` "
        "when unset."
    )
    model_name: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN, description="The name a worker's model is served "
        "under (requests choose it with `model`); its queue is then PREFIX.NAME:*.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Several models in one deployment: NAME=SPEC "
        "entries, comma-separated in the variable (for `api`, NAME alone is enough).")
    default_model: str | None = Field(
        None, pattern=MODEL_NAME_PATTERN,
        description="The model of requests that name none; the first declared when unset.")
    fleet_file: Path | None = Field(
        None, description="A TOML file declaring the served models with per-model spec, "
        "dtype, devices, workers and batch limits (docs/fleet.md).")
    devices: str | None = Field(
        None, pattern=DEVICES_PATTERN, description="`serve`: where workers run: all (every "
        "visible GPU, one worker each), 0,1,3, or cpu; every visible GPU when unset.")
    switch_timeout_s: float = Field(
        120.0, gt=0, description="How long a model's workers wait for each other to load a "
        "new version before the loaded ones switch without the laggards (which then stop "
        "serving until they have it).")
    unet: str | None = Field(
        None, description="UNet weights on top of the model: a flat safetensors file (e.g. "
        "CleanDIFT's), an official full checkpoint, or hf://OWNER/REPO/FILE from the hub.")
    device: str | None = Field(None, pattern=DEVICE_PATTERN,
                               description="cpu, cuda, cuda:1, mps; auto when unset.")
    dtype: FloatName | None = Field(
        None, description="float16, bfloat16, float32 (fp16/bf16/fp32 accepted); auto when "
        "unset: float16 on CUDA, float32 elsewhere.")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="Demo models and cached prompt embeddings.")
    demo_seed: int = Field(0, ge=0, description="Weights seed of the built-in demo model.")
    compile: bool = Field(False, description="torch.compile the model's blocks when a worker "
                          "starts (and each reloaded version); kernels cached in cache_dir.")
    compile_backend: str = Field("inductor", description="torch.compile backend.")

    # Publishing
    gate_margin: float = Field(
        GATE_MARGIN, ge=0, le=1, description="`publish`, `publish --promote` and `train` "
        "refuse to make a version LATEST when its warp PCK@0.10 (cleandift eval-warps, on the "
        "correspondence layer) is below the live version's by more than this; --force "
        "overrides.")

    # Queue (Redis Streams)
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("CLEANDIFT_REDIS_URL", "REDIS_URL"),
        description="The queue; `serve` starts a private redis-server when unset.",
    )
    redis_server: str | None = Field(None, description="redis-server binary for `serve`.")
    queue_prefix: str = Field("cleandift", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    redis_cluster: bool = Field(False, description="The Redis URL names a node of a Redis "
                                "Cluster: keys carry hash tags, the client follows slots.")
    queue_partitions: int = Field(1, ge=1, le=256, description="Streams per model's queue "
                                  "(spread over a cluster's nodes; the API and every worker "
                                  "must agree). docs/scale.md.")
    max_queue: int = Field(256, ge=1, description="Jobs waiting or running before 429.")
    max_batch: int = Field(16, ge=1, description="Images per forward pass at most.")
    max_batch_pixels: int = Field(16 * 768 * 768, ge=64 * 64,
                                  description="Input pixels per forward pass at most.")
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of one request.")
    visibility_timeout_s: float = Field(30.0, gt=0, description="Reclaim pending jobs after.")
    max_deliveries: int = Field(3, ge=1)
    result_ttl_s: int = Field(120, ge=1)
    heartbeat_s: float = Field(2.0, gt=0)
    cancel_poll_s: float = Field(
        0.5, gt=0, description="A worker asks Redis whether a running job's client went away "
        "at most this often (between DIFT passes and match blocks).")
    worker_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long is dead.")
    forward_timeout_s: float = Field(
        300.0, gt=0, description="A forward pass running longer is hung: the worker stops "
        "holding its jobs (others take them) and reports not ready and not alive.")
    stream_maxlen: int = Field(10_000, ge=100, description="Approximate trim of the streams.")

    # Requests
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    min_size: int = Field(64, ge=64)
    max_size: int = Field(1024, ge=64)
    max_points: int = Field(1000, ge=1)
    match_max_pixels: int = Field(
        10_000_000, ge=1, description="Candidate target pixels one /correspond may evaluate "
        "(all its targets together) while proving DIFT's argmax; past it, or within "
        "match_answer_margin_s of the deadline, open searches stop and their matches say "
        "`exact: false`. The worst case of one point is 4 x target rows x grid columns.")
    match_answer_margin_s: float = Field(
        1.0, ge=0, description="Matching stops this long before a request's deadline, so "
        "that an approximate answer (marked) still arrives instead of a 504.")
    max_targets: int = Field(16, ge=1, description="Targets of one /correspond.")
    max_matches: int = Field(200, ge=1)
    max_prompt_chars: int = Field(1000, ge=0)
    max_job_cost: float = Field(
        CPU_JOB_COST, gt=0, description="What one request may cost a worker, in megapixel-"
        "passes (cleandift/cost.py: images x size² x UNet passes x depth of the deepest "
        "layer, plus the VAE and the points matched); over it: 422. 6 keeps the costliest "
        "request under 20 s on 2 busy CPU cores with the demo model (docs/reliability.md); "
        "`serve` makes it 300 when its workers run on a GPU and it is not set; set it for "
        "a GPU deployment of `api` (compose and k8s do).")

    def job_cost_for(self, device: str) -> Settings:
        """These settings with the ceiling for workers on `device`, unless set explicitly:
        a GPU runs a megapixel-pass some 50x faster than 2 CPU cores (SD 2.1's DIFT at 768
        px is 6.6 and would be refused at the CPU default)."""
        if "max_job_cost" in self.model_fields_set or device == "cpu":
            return self
        return self.model_copy(update={"max_job_cost": GPU_JOB_COST})
    decode_memory_bytes: int = Field(
        512 * 1024 * 1024, ge=1024 * 1024,
        description="Memory an API process may hold in images being decoded at once; "
        "uploads beyond it wait for room.")
    decode_at: Literal["auto", "api"] = Field(
        "auto", description="Where uploads are decoded: `auto` sends them to the workers "
        "as uploaded (small jobs; the API reads headers only) once every live worker of the "
        "model reads job format v4, else the API decodes; `api` always decodes in the API "
        "(workers short of CPU). docs/scale.md.")
    decode_threads: int = Field(
        2, ge=1, description="Threads a worker decodes uploads with: at most this many "
        "images are decoded at once (each within max_image_pixels).")
    api_key: SecretStr | None = Field(
        None, description="Clients must send it (Authorization: Bearer KEY or X-API-Key); "
        "set it by environment or a secret, never on a command line.")

    # Processes
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    worker_port: int = Field(
        9001, ge=0, le=65535,
        validation_alias=AliasChoices("CLEANDIFT_WORKER_PORT", "CLEANDIFT_WORKER_METRICS_PORT"),
        description="A worker's HTTP port: probes, metrics, and large results the API "
        "fetches directly; 0 takes any free port.")
    worker_advertise_host: str | None = Field(
        None, description="The address the API reaches a worker at (e.g. the pod IP); the "
        "bind address, or this host's address when bound to 0.0.0.0.")
    result_transport: Literal["direct", "redis"] = Field(
        "direct", description="direct: large results go worker -> API in one hop; redis: "
        "every result travels through Redis (when workers cannot be reached).")
    inline_result_bytes: int = Field(256 * 1024, ge=0,
                                     description="Results up to this size travel inline.")
    result_store_bytes: int = Field(
        2 * 1024**3, ge=1024 * 1024, description="Memory a worker holds in results waiting "
        "to be fetched; beyond it, results travel through Redis.")
    result_hold_s: float = Field(30.0, gt=0,
                                 description="A held result not fetched by then is dropped.")
    worker_idle_timeout_s: float = Field(
        30.0, gt=0, description="A connection to a worker's port that sends nothing this "
        "long is closed (each holds a thread); also the longest one send of a result may "
        "take.")
    feature_cache_bytes: int = Field(
        512 * 1024**2, ge=0, description="Each worker's in-memory feature cache (0: off).")
    feature_cache_shared_bytes: int = Field(
        256 * 1024**2, ge=0, description="The feature cache shared by all workers, in Redis, "
        "within this budget (0: off). Redis must not evict keys itself (noeviction).")
    worker_id: str | None = None
    workers: int = Field(1, ge=1, description="Workers started by `serve`.")
    api_workers: int = Field(1, ge=1, description="API processes (uvicorn workers).")
    post_threads: int = Field(2, ge=1, description="A worker's threads encoding results "
                              "and matching, beside the forward thread.")
    torch_threads: int | None = Field(
        None, ge=1, description="A worker's intra-op CPU threads; on CPU, one worker per core "
        "with 1 thread each beats one worker with all cores."
    )
    reload_poll_s: float = Field(5.0, gt=0, description="Registry LATEST check period.")

    # Observability
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Root log level of the service's processes.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one object per line with the request id.")
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry spans: otlp (the standard OTEL_EXPORTER_OTLP_* "
        "variables say where) or console; needs the tracing extra.")
    metrics_dir: Path | None = Field(
        None, description="Where several API processes keep their shared metrics files "
        "(emptied at start); a fresh temporary directory when unset.")

    def extractor_args(self) -> dict[str, object]:
        """The keyword arguments of `load_extractor` that these settings choose."""
        return {"spec": self.model, "unet": self.unet, "device": self.device,
                "dtype": self.dtype, "cache_dir": self.cache_dir, "demo_seed": self.demo_seed}

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        """A URL redis-py can open, or the command stops here with one line (not a
        traceback from deep in the client at its first connection)."""
        if value is None:
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError("a Redis URL starts with " + ", ".join(REDIS_SCHEMES))
        try:
            urlsplit(value).port  # noqa: B018 (raises on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL: {exc}") from exc
        return value

    @field_validator("min_size", "max_size")
    @classmethod
    def _size_multiple(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            raise ValueError(f"sizes are multiples of {SIZE_MULTIPLE}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: object) -> object:
        return canonical_dtype(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is above max_size ({self.max_size})")
        if self.heartbeat_s >= self.worker_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below worker_ttl_s "
                             f"({self.worker_ttl_s}): workers would flap between dead and alive")
        if self.result_ttl_s < self.request_timeout_s:
            raise ValueError(f"result_ttl_s ({self.result_ttl_s}) must be at least "
                             f"request_timeout_s ({self.request_timeout_s})")
        return self
