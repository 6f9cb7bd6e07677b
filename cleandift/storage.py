"""Where a feature dataset lives: a local folder, or any fsspec URL (`s3://bucket/feats`,
`gs://…`, `memory://…`, `file://…`; the protocol's package installed: docs/datasets.md).

The two kinds commit a shard differently because object stores cannot rename or append:
a local folder writes the shard to a temporary file, fsyncs and renames it, then appends
its lines to `index.jsonl`; a URL writes the shard object, then the shard's index lines as
one more object under `index.d/` (an object appears whole or not at all). Either way the
index names only shards that are complete, and `read_index` gives the same rows in input
order, so `FeatureDataset` reads both alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors
from safetensors.torch import save_file

MANIFEST = "manifest.json"
INDEX = "index.jsonl"
INDEX_PARTS = "index.d"  # one `shard-NNNNN.jsonl` per committed shard, for URLs
# A URL names a filesystem protocol (`s3://`); http(s) lists images, it holds no dataset.
_URL = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*)://", re.I)


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL other than http(s)."""
    match = _URL.match(str(location))
    return match is not None and match.group("protocol").lower() not in ("http", "https")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it); an unknown protocol, or one whose package is not
    installed, is a usage error that says what to install."""
    import fsspec

    from .contract import UsageError

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"{url}: {exc} (pip install 'cleandift[s3]' or '[gcs]': "
                         "docs/datasets.md)") from exc


class Store(Protocol):
    """An output folder: what `extract-dataset` writes and `FeatureDataset` reads."""

    location: str

    def read_text(self, name: str) -> str | None: ...
    def write_text(self, name: str, text: str) -> None: ...
    def drop_strays(self) -> None: ...
    def read_index(self) -> list[dict[str, Any]]: ...
    def commit(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               rows: list[dict[str, Any]]) -> None: ...
    def tensors(self, name: str) -> Any: ...


def open_store(location: str | Path) -> Store:
    return RemoteStore(str(location)) if is_url(location) else LocalStore(Path(location))


def _rows(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _lines(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


class LocalStore:
    def __init__(self, folder: Path) -> None:
        self.folder, self.location = folder, str(folder)

    def read_text(self, name: str) -> str | None:
        path = self.folder / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(text)

    def drop_strays(self) -> None:
        for stray in self.folder.glob("*.tmp"):  # a shard that a killed run did not commit
            stray.unlink()

    def read_index(self) -> list[dict[str, Any]]:
        return _rows(self.read_text(INDEX) or "")

    def commit(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               rows: list[dict[str, Any]]) -> None:
        """The shard (temp file, fsync, rename), then its index lines (append, fsync)."""
        if tensors:
            temp = self.folder / (name + ".tmp")
            save_file(tensors, str(temp), metadata=metadata)
            _fsync(temp)
            os.replace(temp, self.folder / name)
        with open(self.folder / INDEX, "a") as index:
            index.write(_lines(rows))
            index.flush()
            os.fsync(index.fileno())

    def tensors(self, name: str) -> Any:
        """A shard opened lazily (`get_tensor` reads one tensor)."""
        from safetensors import safe_open

        return safe_open(str(self.folder / name), framework="pt")


class RemoteStore:
    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.root = filesystem(self.location)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read_text(self, name: str) -> str | None:
        path = self._path(name)
        return self.fs.cat_file(path).decode() if self.fs.isfile(path) else None

    def write_text(self, name: str, text: str) -> None:
        self.fs.pipe_file(self._path(name), text.encode())

    def drop_strays(self) -> None:
        """Nothing to do: a shard written without its index part is written again."""

    def read_index(self) -> list[dict[str, Any]]:
        parts = self._path(INDEX_PARTS)
        if not self.fs.isdir(parts):
            return []
        names = sorted((p for p in self.fs.find(parts) if p.endswith(".jsonl")),
                       key=lambda p: int(re.findall(r"\d+", p.rsplit("/", 1)[-1])[-1]))
        return [row for name in names for row in _rows(self.fs.cat_file(name).decode())]

    def commit(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               rows: list[dict[str, Any]]) -> None:
        """The shard object, then its index part: both whole or absent."""
        if tensors:
            self.fs.pipe_file(self._path(name), dump_tensors(tensors, metadata=metadata))
        part = name.rsplit(".", 1)[0] + ".jsonl"
        self.fs.pipe_file(self._path(f"{INDEX_PARTS}/{part}"), _lines(rows).encode())

    def tensors(self, name: str) -> Any:
        """A shard read whole (one request), answering `get_tensor` like safe_open."""
        return _Loaded(load_tensors(self.fs.cat_file(self._path(name))))


class _Loaded:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
