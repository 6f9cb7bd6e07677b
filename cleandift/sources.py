"""Where images come from, for training and for bulk extraction: a folder (recursive), a
list of files or URLs (one per line), or WebDataset / img2dataset tar shards.

Every source becomes a list of records in a fixed order, each with a stable `key` (the
path under the folder, the line of the list, `shard.tar/member` in a shard), so a run can
be resumed at the exact item it stopped at and results can be found again by key.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .contract import UsageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_EXTS = (".txt", ".lst", ".list")
URL = re.compile(r"^https?://", re.I)
FETCH_TIMEOUT_S = 60.0
# Limits of one image read from a dataset (decoding stops beyond them: an error row).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000


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
            return parse_caption(sidecar.name, sidecar.read_bytes())
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


def read_image_bytes(record: Record) -> bytes:
    """The record's bytes (a URL is fetched: OSError when it cannot be)."""
    if URL.match(record.source):
        import httpx

        try:
            response = httpx.get(record.source, timeout=FETCH_TIMEOUT_S, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(f"cannot fetch {record.source}: {exc}") from exc
        return response.content
    if not record.image:
        return Path(record.source).read_bytes()
    with tarfile.open(record.source) as tar:
        return tar.extractfile(record.image).read()  # type: ignore[union-attr]
