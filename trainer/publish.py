"""Publishing weights into the registry the service watches, and announcing them."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from cleandift import registry

log = logging.getLogger(__name__)


def publish_weights(
    registry_dir: Path,
    name: str,
    unet_state: dict[str, torch.Tensor] | Path,
    manifest: dict,
    *,
    heads_state: dict[str, torch.Tensor] | None = None,
    redis_url: str | None = None,
    channel: str = registry.announce_channel("cleandift"),
    make_latest: bool = True,
) -> tuple[str, Path]:
    """Write a new version (atomically), make it LATEST, and announce it on Redis; without
    `make_latest` (a version the quality gate refused) it is only written."""
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        if isinstance(unet_state, Path):
            files[registry.UNET_FILE] = unet_state
        else:
            files[registry.UNET_FILE] = Path(tmp) / registry.UNET_FILE
            save_file(_contiguous(unet_state), str(files[registry.UNET_FILE]))
        if heads_state is not None:
            files[registry.HEADS_FILE] = Path(tmp) / registry.HEADS_FILE
            save_file(_contiguous(heads_state), str(files[registry.HEADS_FILE]))
        version, path = registry.publish(registry_dir, name, files, manifest,
                                         make_latest=make_latest)
    log.info("published %s %s at %s%s", name, version, path, "" if make_latest else
             " (not LATEST)")
    if redis_url and make_latest:
        announce(redis_url, channel, registry_dir, name, version)
    return version, path


def announce(redis_url: str, channel: str, registry_dir: Path, name: str, version: str) -> None:
    """Tell watching workers at once; they also poll LATEST, so a lost message is fine."""
    import redis

    from cleandift.service.queue.connect import sync_client

    message = {"registry": str(Path(registry_dir).resolve()), "name": name, "version": version}
    try:
        sync_client(redis_url).publish(
            channel, json.dumps(message)
        )
    except redis.RedisError as exc:
        log.warning("could not announce %s %s on Redis: %s", name, version, exc)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
