"""The one configuration object: every tunable, from `CLEANDIFT_*` env vars or CLI flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # Empty variables count as unset (compose and k8s often pass VAR="" for "default").
    model_config = SettingsConfigDict(
        env_prefix="CLEANDIFT_", extra="ignore", env_ignore_empty=True
    )

    # Model
    model: str | None = Field(
        None, description="Model spec: diffusers folder, hub id or registry DIR/NAME[/VERSION]; "
        "the built-in demo model when unset."
    )
    unet: Path | None = Field(None, description="Flat UNet safetensors (e.g. CleanDIFT's).")
    device: str | None = Field(None, description="cuda, cuda:1, cpu; auto when unset.")
    dtype: str | None = Field(None, description="float16, bfloat16, float32; auto when unset.")
    cache_dir: Path = Field(Path.home() / ".cache" / "cleandift")
    demo_seed: int = 0

    # Queue (Redis Streams)
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("CLEANDIFT_REDIS_URL", "REDIS_URL")
    )
    redis_server: str | None = Field(None, description="redis-server binary for `serve`.")
    queue_prefix: str = "cleandift"
    max_queue: int = Field(256, ge=1, description="Jobs waiting or running before 429.")
    max_batch: int = Field(16, ge=1)
    max_batch_pixels: int = Field(16 * 768 * 768, ge=64 * 64)
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of one request.")
    visibility_timeout_s: float = Field(30.0, gt=0, description="Reclaim pending jobs after.")
    max_deliveries: int = Field(3, ge=1)
    result_ttl_s: int = Field(120, ge=1)
    heartbeat_s: float = Field(2.0, gt=0)
    worker_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long is dead.")
    stream_maxlen: int = Field(10_000, ge=100, description="Approximate trim of the streams.")

    # Requests
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    min_size: int = Field(64, ge=64)
    max_size: int = Field(1024, ge=64)
    max_points: int = Field(1000, ge=1)
    max_matches: int = Field(200, ge=1)
    max_prompt_chars: int = Field(1000, ge=0)
    api_key: str | None = None

    # Processes
    host: str = "127.0.0.1"
    port: int = 8000
    worker_metrics_port: int = Field(9001, ge=0, description="0 disables it.")
    worker_id: str | None = None
    workers: int = Field(1, ge=1, description="Workers started by `serve`.")
    api_workers: int = Field(1, ge=1, description="API processes (uvicorn workers).")
    torch_threads: int | None = Field(
        None, ge=1, description="A worker's intra-op CPU threads; on CPU, one worker per core "
        "with 1 thread each beats one worker with all cores."
    )
    reload_poll_s: float = Field(5.0, gt=0, description="Registry LATEST check period.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once (tests build their own Settings instead)."""
    return Settings()
