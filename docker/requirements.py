"""Print what a wheel and the given extras require (its Requires-Dist lines, their
`extra` clauses resolved, other markers kept), one per line, for `pip install -r`.

The worker image installs these in a layer of their own, before the wheel itself: the
layer depends only on the declared dependencies, so a change of code rebuilds the small
layer of our package instead of reinstalling torch, diffusers and the rest.
Standard library only (it runs in the build stage's bare Python).

    python docker/requirements.py dist/cleandift_service-0.1.0-py3-none-any.whl serve,train
"""

from __future__ import annotations

import re
import sys
import zipfile
import zlib
from email.message import Message
from email.parser import Parser

EXTRA = re.compile(r"""\s*(?:\band\s+)?extra\s*==\s*["']([\w.-]+)["'](?:\s+and\b)?\s*""")


class BadInput(Exception):
    """A wheel or an EXTRAS value this script cannot turn into requirements: the image
    build stops with its message (an extra misspelt in EXTRAS would otherwise build an
    image without that extra's packages, found missing only when the worker starts)."""


def requirements(wheel: str, extras: set[str]) -> list[str]:
    metadata = _metadata(wheel)
    project = _normal(metadata["Name"])
    provided = metadata.get_all("Provides-Extra") or []
    unknown = {_normal(e) for e in extras} - {_normal(e) for e in provided}
    if unknown:  # names compared normalised (PEP 685), as pip does: Serve is serve
        raise BadInput(f"{wheel} has no extra {', '.join(sorted(unknown))}; its extras: "
                       f"{', '.join(provided) or 'none'}")
    entries = []  # (requirement, its extra or None, the rest of its marker)
    for line in metadata.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        found = EXTRA.search(marker)
        entries.append((requirement.strip(), _normal(found.group(1)) if found else None,
                        EXTRA.sub(" ", marker).strip()))
    wanted, grew = {_normal(e) for e in extras}, True
    while grew:  # an extra may name others of this project: `all = [project[serve,...]]`
        grew = False
        for requirement, extra, _ in entries:
            own = _own_extras(requirement, project)
            if own is not None and (extra is None or extra in wanted) and own - wanted:
                wanted |= own
                grew = True
    return [requirement + (f"; {rest}" if rest else "")
            for requirement, extra, rest in entries
            if (extra is None or extra in wanted) and _own_extras(requirement, project) is None]


def _metadata(wheel: str) -> Message:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist()  # top level only: not a vendored copy
                     if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise BadInput(f"{wheel} is not a wheel: {len(names)} .dist-info/METADATA")
            metadata = Parser().parsestr(archive.read(names[0]).decode())
    # unreadable, not a zip, a damaged or unknown compression, METADATA not UTF-8
    except (OSError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            UnicodeDecodeError) as exc:
        raise BadInput(f"{wheel} cannot be read as a wheel: {exc}") from exc
    if not metadata["Name"]:
        raise BadInput(f"{wheel}'s METADATA names no project")
    return metadata


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _own_extras(requirement: str, project: str) -> set[str] | None:
    match = re.fullmatch(r"([\w.-]+)\s*\[([^\]]*)\]", requirement)
    if match is None or _normal(match.group(1)) != project:
        return None
    return {_normal(part.strip()) for part in match.group(2).split(",") if part.strip()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: requirements.py WHEEL EXTRAS (comma-separated, may be empty)",
              file=sys.stderr)
        return 1
    wheel, extras = argv[0], {e.strip() for e in argv[1].split(",") if e.strip()}
    try:
        print("\n".join(requirements(wheel, extras)))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
