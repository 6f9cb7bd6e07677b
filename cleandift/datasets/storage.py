"""Where a feature dataset lives: a local folder, or any fsspec URL (`s3://bucket/feats`,
`gs://…`, `memory://…`, `file://…`; the protocol's package installed: docs/datasets.md).

The two kinds commit a shard differently because object stores cannot rename or append:
a local folder (or `file://`) writes the shard to a temporary file, fsyncs and renames
it, then appends its lines to `index.jsonl`; another URL writes the shard object, then the
shard's index lines as one more object under `index.d/` (an object appears whole or not at
all). Either way the index names only shards that are complete, and `read_index` gives the
same rows in input order. Both kinds read (and resume) either layout, so a dataset copied
between a disk and a bucket stays readable, and `FeatureDataset` reads them alike.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..contract import UsageError

if TYPE_CHECKING:  # imported where tensors are written or read: reading images (sources,
    import torch  # the Ray engine's read tasks) needs the paths here, not torch

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
    """A `file://` URL is a local folder (renames and fsync work there); any other URL
    goes through fsspec."""
    if is_url(location):
        fs, path = filesystem(str(location))
        if "file" in _protocols(fs):
            return LocalStore(Path(path))
        return RemoteStore(str(location))
    return LocalStore(Path(location))


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _rows(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _lines(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _part_name(shard: str) -> str:
    return f"{INDEX_PARTS}/{shard.rsplit('.', 1)[0]}.jsonl"


def _part_order(name: str) -> int:
    return int(re.findall(r"\d+", name.rsplit("/", 1)[-1])[-1])


class _IndexedStore:
    """The index, in either layout, for both kinds of store: a dataset written at a URL
    and copied to a disk (or the other way round) reads, and resumes, where it lands.
    Subclasses give the primitives: whole-object reads, atomic writes, part listing."""

    location: str

    _chosen: str | None = None  # the layout this run writes, once known

    def _exists(self, name: str) -> bool: raise NotImplementedError
    def _read(self, name: str) -> bytes | None: raise NotImplementedError
    def _write(self, name: str, data: bytes) -> None: raise NotImplementedError
    def _parts(self) -> list[str] | None: raise NotImplementedError  # None: no index.d/

    def read_text(self, name: str) -> str | None:
        data = self._read(name)
        return None if data is None else data.decode()

    def write_text(self, name: str, text: str) -> None:
        self._write(name, text.encode())

    def _layout(self, default: str) -> str:
        parts, single = self._parts() is not None, self._exists(INDEX)
        if parts and single:
            raise UsageError(f"{self.location} holds both {INDEX} and {INDEX_PARTS}/: "
                             "keep one (they are two copies of the same index)")
        return "parts" if parts else INDEX if single else default

    def read_index(self) -> list[dict[str, Any]]:
        if self._layout(INDEX) == INDEX:
            return _rows(self.read_text(INDEX) or "")
        names = sorted(self._parts() or [], key=_part_order)
        return [row for name in names for row in _rows(self.read_text(name) or "")]

    def _commit_rows(self, shard: str, rows: list[dict[str, Any]], default: str) -> None:
        self._chosen = self._chosen or self._layout(default)
        if self._chosen == "parts":
            self._write(_part_name(shard), _lines(rows).encode())
        else:
            self._append_index(_lines(rows))

    def _append_index(self, text: str) -> None:
        """An object store cannot append: the index is written again, whole."""
        self._write(INDEX, (self.read_text(INDEX) or "").encode() + text.encode())


class LocalStore(_IndexedStore):
    def __init__(self, folder: Path) -> None:
        self.folder, self.location = folder, str(folder)

    def _exists(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def _read(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.is_file() else None

    def _write(self, name: str, data: bytes) -> None:
        """Temp file, fsync, rename: a reader sees the old file or the new one."""
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        temp.write_bytes(data)
        _fsync(temp)
        os.replace(temp, path)

    def _parts(self) -> list[str] | None:
        folder = self.folder / INDEX_PARTS
        if not folder.is_dir():
            return None
        return [f"{INDEX_PARTS}/{p.name}" for p in folder.glob("*.jsonl")]

    def drop_strays(self) -> None:
        for stray in self.folder.glob("**/*.tmp"):  # what a killed run did not commit
            stray.unlink()

    def commit(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               rows: list[dict[str, Any]]) -> None:
        """The shard (temp file, fsync, rename), then its index lines."""
        if tensors:
            self.folder.mkdir(parents=True, exist_ok=True)
            temp = self.folder / (name + ".tmp")
            from safetensors.torch import save_file

            save_file(tensors, str(temp), metadata=metadata)
            _fsync(temp)
            os.replace(temp, self.folder / name)
        self._commit_rows(name, rows, INDEX)

    def _append_index(self, text: str) -> None:
        with open(self.folder / INDEX, "a") as index:
            index.write(text)
            index.flush()
            os.fsync(index.fileno())

    def tensors(self, name: str) -> Any:
        """A shard opened lazily (`get_tensor` reads one tensor)."""
        from safetensors import safe_open

        return safe_open(str(self.folder / name), framework="pt")


class RemoteStore(_IndexedStore):
    def __init__(self, url: str) -> None:
        self.location = url.rstrip("/")
        self.fs, self.root = filesystem(self.location)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _exists(self, name: str) -> bool:
        return bool(self.fs.isfile(self._path(name)))

    def _read(self, name: str) -> bytes | None:
        path = self._path(name)
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def _write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)  # an object appears whole or not at all

    def _parts(self) -> list[str] | None:
        folder = self._path(INDEX_PARTS)
        if not self.fs.isdir(folder):
            return None
        return [f"{INDEX_PARTS}/{p.rsplit('/', 1)[-1]}" for p in self.fs.find(folder)
                if p.endswith(".jsonl")]

    def drop_strays(self) -> None:
        """Nothing to do: a shard written without its index part is written again."""

    def commit(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               rows: list[dict[str, Any]]) -> None:
        """The shard object, then its index part: both whole or absent."""
        if tensors:
            from safetensors.torch import save

            self._write(name, save(tensors, metadata=metadata))
        self._commit_rows(name, rows, "parts")

    def tensors(self, name: str) -> Any:
        """A shard read whole (one request), answering `get_tensor` like safe_open."""
        from safetensors.torch import load

        return _Loaded(load(self.fs.cat_file(self._path(name))))


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
