"""The weights registry: DIR/NAME/VERSION/{unet.safetensors, heads.safetensors, manifest.json}.

Versions appear atomically (written in a staging folder, then renamed into place) and
DIR/NAME/LATEST names the live one, replaced atomically too. Every file carries a sha256
in the manifest, checked on load, so a torn or tampered version is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .contract import UsageError

MANIFEST = "manifest.json"
LATEST = "LATEST"
UNET_FILE = "unet.safetensors"
HEADS_FILE = "heads.safetensors"
_VERSION = re.compile(r"^v(\d+)$")
# Names and versions are one path segment of a safe alphabet: never "..", never a "/",
# never hidden (the staging folders are), so nothing they name leaves DIR/NAME.
SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHARED_DIR_MODE, SHARED_FILE_MODE = 0o755, 0o644

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


class RegistryError(RuntimeError):
    pass


class InvalidName(RegistryError, UsageError):
    """A model name or version that is not one safe path segment (CLI exit 2)."""


def check_segment(value: str, what: str = "model name") -> str:
    """`value` if it is one path segment of letters, digits and `._-` (not starting with
    a dot); else InvalidName. Every function taking a name or a version checks it."""
    if not isinstance(value, str) or not SEGMENT.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "…"
        raise InvalidName(f"invalid {what} {shown}: one path segment of letters, digits and "
                          "'._-', not starting with '.'")
    return value


def announce_channel(prefix: str) -> str:
    """The Redis channel on which new versions are announced to watching workers."""
    return f"{prefix}:registry"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_registry_path(path: Path) -> bool:
    return (path / LATEST).is_file() or (path / MANIFEST).is_file()


def read_latest(model_dir: Path) -> str | None:
    """The version LATEST names (None without one); InvalidName when it names anything
    but a version folder of this model (`../../elsewhere/v9`)."""
    try:
        text = (Path(model_dir) / LATEST).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    return check_segment(text, f"version in {Path(model_dir) / LATEST}") if text else None


def latest_version(model_dir: Path) -> str | None:
    """As read_latest, for watchers: an invalid LATEST counts as none (logged), so a
    worker keeps serving what it serves instead of following it out of the registry."""
    try:
        return read_latest(model_dir)
    except InvalidName as exc:
        if str(exc) not in _WARNED:  # once, not at every poll
            _WARNED.add(str(exc))
            log.warning("ignoring %s", exc)
        return None


def resolve(path: Path) -> Path:
    """DIR/NAME (follows LATEST) or DIR/NAME/VERSION -> the version folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    version = read_latest(path)
    if version is None:
        raise RegistryError(f"{path} is not a registry model: no {LATEST} or {MANIFEST}")
    if not (path / version / MANIFEST).is_file():
        raise RegistryError(f"{path}/{LATEST} names {version!r}, which has no {MANIFEST}")
    return path / version


def read_manifest(version_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a version, after checking every file's sha256 when `verify`."""
    version_dir = Path(version_dir)
    try:
        manifest: dict[str, Any] = json.loads((version_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"unreadable manifest in {version_dir}: {exc}") from exc
    if verify:
        for name, expected in manifest.get("sha256", {}).items():
            path = version_dir / name
            if not path.is_file():
                raise RegistryError(f"{path} is listed in the manifest but missing")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(
                    f"checksum mismatch for {path}: manifest {expected[:12]}…, file {actual[:12]}…"
                )
    return manifest


def _version_numbers(model_dir: Path) -> dict[int, str]:
    return {int(m.group(1)): p.name for p in model_dir.iterdir() if (m := _VERSION.match(p.name))}


def _next_version(model_dir: Path) -> str:
    return f"v{max(_version_numbers(model_dir), default=0) + 1}"


def _write_latest(model_dir: Path, version: str) -> None:
    check_segment(version, "version")
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=model_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, SHARED_FILE_MODE)
    os.replace(tmp, model_dir / LATEST)


def publish(
    registry: Path,
    name: str,
    files: dict[str, Path],
    manifest: dict[str, Any],
    *,
    make_latest: bool = True,
) -> tuple[str, Path]:
    """Copy `files` into a new version of NAME with its manifest; returns (version, folder)."""
    model_dir = Path(registry) / check_segment(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    os.chmod(staging, SHARED_DIR_MODE)  # trainer and workers may run as different users
    try:
        for target, source in files.items():
            shutil.copyfile(source, staging / target)
            os.chmod(staging / target, SHARED_FILE_MODE)
        checksums = {t: sha256_file(staging / t) for t in files}
        for _attempt in range(100):
            version = _next_version(model_dir)
            record = {
                **manifest,
                "name": name,
                "version": version,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "sha256": checksums,
            }
            (staging / MANIFEST).write_text(json.dumps(record, indent=2))
            os.chmod(staging / MANIFEST, SHARED_FILE_MODE)
            try:
                os.rename(staging, model_dir / version)  # atomic; fails if taken
                break
            except OSError:
                continue
        else:
            raise RegistryError(f"could not allocate a version under {model_dir}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if make_latest:
        _write_latest(model_dir, version)
    return version, model_dir / version


def promote(registry: Path, name: str, version: str) -> None:
    """Make an existing (verified) version LATEST again: the rollback path."""
    model_dir = Path(registry) / check_segment(name)
    read_manifest(model_dir / check_segment(version, "version"))
    _write_latest(model_dir, version)


def list_versions(registry: Path, name: str) -> list[str]:
    numbers = _version_numbers(Path(registry) / check_segment(name))
    return [numbers[n] for n in sorted(numbers)]
