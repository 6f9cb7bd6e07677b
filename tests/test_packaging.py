"""How the project installs: one import namespace, every package folder shipped, the API
free of torch, and no code reaching for the folders' generic names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"cleandift": "cleandift", "service": "cleandift.service",
           "trainer": "cleandift.trainer", "bench": "cleandift.bench"}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_its_namespaced_name():
    config = _config()
    assert {config["package-dir"][name]: name for name in config["package-dir"]} == FOLDERS
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"])


@pytest.mark.integration  # pip / a child interpreter
def test_the_wheel_installs_only_the_cleandift_namespace(tmp_path):
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT), "-w", str(tmp_path)], check=True,
                   capture_output=True)
    if not had_build:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"cleandift", wheel.name.split("-")[0] + "-"
                                                + wheel.name.split("-")[1] + ".dist-info"}
    assert "cleandift/service/api/static/app.js" in names
    assert "cleandift/trainer/train.py" in names and "cleandift/bench/gpu.py" in names


def test_no_code_imports_the_generic_folder_names():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".venv", "build"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and node.level == 0 else [])
            offenders += [f"{path}: {n}" for n in names
                          if n.split(".")[0] in ("service", "trainer", "bench")]
    assert offenders == []


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "accelerate"):
            raise ImportError(f"the API must not import {name}")
sys.meta_path.insert(0, Block())
from cleandift.service.api.app import create_app
from cleandift.settings import Settings
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
assert app.openapi()["paths"]
from cleandift.cli import main

"""


@pytest.mark.integration  # pip / a child interpreter
def test_the_api_imports_without_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
