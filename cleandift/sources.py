"""Where images come from, for training and for bulk extraction: a folder (recursive), a
list of files or URLs (one per line), or WebDataset / img2dataset tar shards.

Every source becomes a list of records in a fixed order, each with a stable `key` (the
path under the folder, the line of the list, `shard.tar/member` in a shard), so a run can
be resumed at the exact item it stopped at and results can be found again by key.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
import stat
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract import UsageError

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
READ_CHUNK = 1 << 16


class ItemError(OSError):
    """One item cannot be read (unreachable, too slow, too large, not a file, malformed
    URL): its error row, never the end of the run."""


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
    """Group a shard's members by key (file name without extension), as webdataset does."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = member
        records = []
        for key, members in sorted(groups.items()):
            image = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTS), None)
            if image is None:
                continue
            caption = ""
            for ext in ("txt", "json"):
                if ext in members:
                    data = tar.extractfile(members[ext]).read()  # type: ignore[union-attr]
                    caption = parse_caption(members[ext].name, data) or caption
            records.append(Record(tar_path, image.name, caption, f"{Path(tar_path).name}/{key}"))
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
    if path.is_dir():
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
            return fetch_url(record.source, limits)
        if not record.image:
            return read_file(Path(record.source), limits.max_bytes)
        return read_member(record.source, record.image, limits.max_bytes)
    except ItemError:
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


def read_member(tar_path: str, member: str, max_bytes: int) -> bytes:
    with tarfile.open(tar_path) as tar:
        info = tar.getmember(member)
        if info.size > max_bytes:
            raise ItemError(f"{tar_path}/{member} is {info.size} bytes; the limit is {max_bytes}")
        handle = tar.extractfile(info)
        if handle is None:
            raise ItemError(f"{tar_path}/{member} is not a regular file")
        return handle.read(max_bytes)


def fetch_url(url: str, limits: ReadLimits) -> bytes:
    """GET `url`, streamed, stopping at `limits.max_bytes` (after decompression) and at
    `limits.fetch_timeout_s` in all: httpx's timeouts apply to each read, so a server that
    sends a byte every few seconds, or without end, would otherwise hold the run."""
    import httpx

    deadline = _Deadline(limits.fetch_timeout_s)
    try:
        with (deadline,
              httpx.Client(timeout=limits.fetch_timeout_s, follow_redirects=True) as client,
              client.stream("GET", url, extensions={"trace": deadline.trace}) as response):
            response.raise_for_status()
            return _capped_body(response, limits.max_bytes, deadline)
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, OSError) as exc:
        if deadline.expired:
            reason = f"it took over {limits.fetch_timeout_s:g} s"
        elif isinstance(exc, httpx.HTTPStatusError):
            reason = f"HTTP {exc.response.status_code}"
        else:
            reason = str(exc) or type(exc).__name__
        raise ItemError(f"cannot fetch {url}: {reason}") from exc


def _capped_body(response: Any, max_bytes: int, deadline: _Deadline) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ItemError(f"it is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    for chunk in response.iter_bytes(READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise ItemError(f"it sent more than {max_bytes} bytes")
        if deadline.expired:
            break
    if deadline.expired:  # (a cut connection can look like the end of a body)
        raise ItemError("out of time")
    return bytes(body)


class _Deadline:
    """Cuts a fetch's connections when its time is up, whatever it is doing (connecting,
    waiting for headers, reading the body): shutting a socket down wakes a blocked read."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()
        self._timer.join()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember each connection as it opens (TCP, then TLS)."""
        if not event.endswith(("connect_tcp.complete", "start_tls.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with self._lock:
                self._sockets.append(sock)
                if self.expired:
                    _cut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the plain socket's shutdown, for TLS too (its own
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # would try to unwrap first)
