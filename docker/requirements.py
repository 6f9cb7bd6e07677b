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
from email.parser import Parser

EXTRA = re.compile(r"""\s*(?:\band\s+)?extra\s*==\s*["']([\w.-]+)["'](?:\s+and\b)?\s*""")


def requirements(wheel: str, extras: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    project = _normal(metadata["Name"])
    entries = []  # (requirement, its extra or None, the rest of its marker)
    for line in metadata.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        found = EXTRA.search(marker)
        entries.append((requirement.strip(), found.group(1) if found else None,
                        EXTRA.sub(" ", marker).strip()))
    wanted, grew = set(extras), True
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


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _own_extras(requirement: str, project: str) -> set[str] | None:
    match = re.fullmatch(r"([\w.-]+)\s*\[([^\]]*)\]", requirement)
    if match is None or _normal(match.group(1)) != project:
        return None
    return {part.strip() for part in match.group(2).split(",") if part.strip()}


if __name__ == "__main__":
    wheel, extras = sys.argv[1], {e.strip() for e in sys.argv[2].split(",") if e.strip()}
    print("\n".join(requirements(wheel, extras)))
