"""Where images come from, for training and for bulk extraction: a folder (recursive), a
list of files or URLs (one per line), or WebDataset / img2dataset tar shards, each on this
machine or behind an fsspec URL (`s3://bucket/photos`, `gs://…/{00000..00099}.tar`).

Every source becomes a list of records in a fixed order, each with a stable `key` (the
path under the folder, the line of the list, `shard.tar/member` in a shard), so a run can
be resumed at the exact item it stopped at and results can be found again by key.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import UsageError
from .fetch import ItemError, fetch_url
from .storage import filesystem, is_url

__all__ = ["ItemError", "ReadLimits", "Record", "load_records", "read_image_bytes"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_EXTS = (".txt", ".lst", ".list")
URL = re.compile(r"^https?://", re.I)
# Limits of one image read from a dataset, all of them here. Past any of them the item is
# an error row and the run goes on: a URL gets FETCH_TIMEOUT_S in all (connecting, headers
# and body together) and MAX_IMAGE_BYTES; a file must be a regular file of at most
# MAX_IMAGE_BYTES (checked before it is read); decoding stops beyond MAX_IMAGE_PIXELS.
FETCH_TIMEOUT_S = 60.0
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
MAX_CAPTION_BYTES = 1 << 20


@dataclass(frozen=True)
class ReadLimits:
    """What reading one item may cost (the defaults are the constants above)."""

    max_bytes: int = MAX_IMAGE_BYTES
    fetch_timeout_s: float = FETCH_TIMEOUT_S


@dataclass(frozen=True)
class Record:
    """Where one image (and its caption) lives: a file, a URL, or a member of a tar shard."""

    source: str  # file path, URL or tar path
    image: str  # member name inside the tar ("" otherwise)
    caption: str = ""
    key: str = ""  # stable name of the item in results and indexes
    offset: int = -1  # where an uncompressed tar member's bytes start (-1: look it up)
    size: int = -1  # and how many there are


def expand_braces(pattern: str) -> list[str]:
    """img2dataset-style shard patterns: `{00000..00009}` ranges and `{a,b}` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if ".." in body:
        lo, hi = body.split("..")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def _caption_from_sidecar(path: Path) -> str:
    for sidecar in (path.with_suffix(".txt"), path.with_suffix(".json")):
        if sidecar.is_file():
            try:
                return parse_caption(sidecar.name, read_file(sidecar, MAX_CAPTION_BYTES))
            except OSError:  # unreadable or huge: no caption, as without a sidecar
                return ""
    return ""


def parse_caption(name: str, data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".json"):
        try:
            value = json.loads(text).get("caption", "")
        except (json.JSONDecodeError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""
    return text.strip()


def folder_records(root: Path) -> list[Record]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [Record(str(p), "", _caption_from_sidecar(p), p.relative_to(root).as_posix())
            for p in paths]


def tar_records(tar_path: str) -> list[Record]:
    """Group a shard's members by key (file name without extension), as webdataset does,
    in the archive's order (a compressed shard is then read once, front to back; captions
    are read as the listing passes them, never by seeking back)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    captions: dict[str, str] = {}
    with _open_binary(tar_path) as fh, tarfile.open(fileobj=fh) as tar:
        seekable = tar.fileobj is fh  # uncompressed: a member is a byte range of the file
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = member
                if ext.lower() in ("txt", "json"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    caption = parse_caption(member.name, data)
                    if caption and (ext.lower() == "json" or key not in captions):
                        captions[key] = caption  # .json wins, as before
        records = []
        for key, members in groups.items():
            image = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTS), None)
            if image is None:
                continue
            records.append(Record(tar_path, image.name, captions.get(key, ""),
                                  f"{Path(tar_path).name}/{key}",
                                  image.offset_data if seekable else -1, image.size))
    return records


def list_records(list_file: Path) -> list[Record]:
    """One path or URL per line; blank lines and `#` comments are skipped. Relative paths
    are relative to the list's folder."""
    records = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if URL.match(entry):
            records.append(Record(entry, "", "", entry))
        else:
            path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
            records.append(Record(str(path), "", _caption_from_sidecar(path), entry))
    return records


def load_records(data: str) -> list[Record]:
    """A folder (recursive), a list file, or shard pattern(s) -> records in a fixed order."""
    path = Path(data)
    if is_url(data):
        records = remote_records(data)
    elif path.is_dir():
        records = folder_records(path)
    elif path.is_file() and path.suffix.lower() in LIST_EXTS:
        records = list_records(path)
    else:
        shards = [s for p in expand_braces(data) for s in sorted(glob.glob(p))]
        if not shards:
            raise FileNotFoundError(f"no image folder, list file or tar shards match {data!r}")
        records = [r for shard in shards for r in tar_records(shard)]
    if not records:
        raise FileNotFoundError(f"no images found in {data!r}")
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise UsageError(f"{data!r} names some images twice: keys must be unique")
    return records


def read_image_bytes(record: Record, limits: ReadLimits = ReadLimits()) -> bytes:
    """The record's bytes within `limits`. Whatever keeps this one item from being read
    is an ItemError (an OSError), so callers make it an error row and go on."""
    try:
        if URL.match(record.source):
            return fetch_url(record.source, limits.max_bytes, limits.fetch_timeout_s)
        if record.image:
            return read_member(record, limits.max_bytes)
        if is_url(record.source):
            return read_remote_file(record.source, limits.max_bytes)
        return read_file(Path(record.source), limits.max_bytes)
    except (ItemError, UsageError):  # UsageError: the URL's package is not installed
        raise
    except (OSError, ValueError, KeyError, tarfile.TarError) as exc:  # ValueError: a NUL
        raise ItemError(f"{record.source}: {exc or type(exc).__name__}") from exc


def read_file(path: Path, max_bytes: int) -> bytes:
    """A regular file of at most `max_bytes`. Anything else is refused from its stat,
    before it is opened: /dev/zero would be read for ever, a FIFO's open blocks until a
    writer comes. The open is non-blocking anyway, and checked again on the open file,
    in case the path was swapped in between."""
    _check_regular(path, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        _check_regular(path, os.fstat(fh.fileno()), max_bytes)
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ItemError(f"{path} grew past {max_bytes} bytes while it was read")
    return data


def _check_regular(path: Path, info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ItemError(f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise ItemError(f"{path} is {info.st_size} bytes; the limit is {max_bytes}")


def read_member(record: Record, max_bytes: int) -> bytes:
    """A tar member: one read at its offset where the listing found it (a range request
    for a URL), else looked up in the tar."""
    name = f"{record.source}/{record.image}"
    if record.offset >= 0:
        if record.size > max_bytes:
            raise ItemError(f"{name} is {record.size} bytes; the limit is {max_bytes}")
        data = _read_range(record.source, record.offset, record.size)
        if len(data) != record.size:
            raise ItemError(f"{name}: the shard ends inside it")
        return data
    stream = getattr(_streams, "current", None)
    if stream is None or stream.source != record.source or record.image in stream.passed:
        if stream is not None:
            stream.close()
        stream = _streams.current = _ShardStream(record.source)
    try:
        return stream.read(record.image, max_bytes)
    except BaseException:  # a broken stream is not read on: the next member reopens
        stream.close()
        _streams.current = None
        raise


_streams = threading.local()  # each reading thread's open compressed shard


class _ShardStream:
    """A compressed shard (no member can be reached without what precedes it), read as one
    forward stream: members asked for in order (as listed) cost one pass over the shard,
    not one per member. A member already passed reopens it."""

    def __init__(self, source: str) -> None:
        self.source, self.passed = source, set[str]()
        self._fh = _open_binary(source)
        self._tar = tarfile.open(fileobj=self._fh, mode="r|*")  # noqa: SIM115 (kept open)
        self._members = iter(self._tar)

    def read(self, member: str, max_bytes: int) -> bytes:
        name = f"{self.source}/{member}"
        for info in self._members:
            self.passed.add(info.name)
            if info.name != member:
                continue
            if info.size > max_bytes:
                raise ItemError(f"{name} is {info.size} bytes; the limit is {max_bytes}")
            handle = self._tar.extractfile(info)
            if handle is None:
                raise ItemError(f"{name} is not a regular file")
            return handle.read(max_bytes)
        raise ItemError(f"{name}: not in the shard")

    def close(self) -> None:
        self._tar.close()
        self._fh.close()


def _read_range(location: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`: for a URL exactly that range is asked for (a file object
    would read ahead a whole block)."""
    if is_url(location):
        fs, path = filesystem(location)
        return bytes(fs.cat_file(path, start=offset, end=offset + size))
    with open(location, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _open_binary(location: str) -> Any:
    """A file on this machine or behind an fsspec URL, open for reading bytes."""
    if is_url(location):
        fs, path = filesystem(location)
        return fs.open(path, "rb")
    return open(location, "rb")


def read_remote_file(url: str, max_bytes: int) -> bytes:
    """An object of at most `max_bytes` (its size asked first, then at most that read)."""
    fs, path = filesystem(url)
    info = fs.info(path)
    if info.get("type") != "file":
        raise ItemError(f"{url} is not a file")
    if (info.get("size") or 0) > max_bytes:
        raise ItemError(f"{url} is {info['size']} bytes; the limit is {max_bytes}")
    with fs.open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ItemError(f"{url} grew past {max_bytes} bytes while it was read")
    return data


def remote_records(url: str) -> list[Record]:
    """A folder, a list file or shard pattern(s) behind an fsspec URL, as for local paths.
    Sidecar captions are read for folders (the listing shows them), not for list files
    (that would cost a request per item)."""
    fs, path = filesystem(url)
    if fs.isdir(path):
        return _remote_folder(fs, path)
    if fs.isfile(path) and Path(path).suffix.lower() in LIST_EXTS:
        base = url.rsplit("/", 1)[0]
        entries = [e.strip() for e in fs.cat_file(path).decode().splitlines()]
        return [Record(e if (URL.match(e) or is_url(e)) else f"{base}/{e}", "", "", e)
                for e in entries if e and not e.startswith("#")]
    # As for local shards: brace expansions in their order, each one's glob sorted.
    shards = [fs.unstrip_protocol(s) for p in expand_braces(path) for s in sorted(fs.glob(p))]
    return [r for shard in shards for r in tar_records(shard)]


def _remote_folder(fs: Any, root: str) -> list[Record]:
    files = set(fs.find(root))
    records = []
    for path in sorted(files, key=lambda p: tuple(p.split("/"))):  # as pathlib sorts
        if Path(path).suffix.lower() not in IMAGE_EXTS:
            continue
        caption = ""
        for sidecar in (str(Path(path).with_suffix(ext)) for ext in (".txt", ".json")):
            if sidecar in files and fs.size(sidecar) <= MAX_CAPTION_BYTES:
                caption = parse_caption(sidecar, fs.cat_file(sidecar))
                break
        key = path[len(root.rstrip("/")) + 1:]
        records.append(Record(fs.unstrip_protocol(path), "", caption, key))
    return records
