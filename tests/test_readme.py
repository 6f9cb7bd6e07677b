"""The README's examples run as pasted: every command of "Calling the API", both Python
snippets and the command-line examples, against `cleandift serve` on the demo model, in a
folder holding only the shipped `examples/` photos. A command that fails (curl's
`--fail-with-body` through CURL_HOME, a non-zero exit, a Python exception) fails the
test with its output. Only the address changes: `localhost:8000` becomes the test's port.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.service_helpers import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
# Long-running or environment-changing lines, run elsewhere (the serve fixture itself, the
# test of `serve | api | worker`); everything else in the chosen blocks runs.
SKIP = re.compile(r"^cleandift (serve|api|worker)\b")


def blocks(section: str | None, language: str) -> list[str]:
    """The fenced `language` blocks of the README's `## section` (None: the opening, before
    the first section)."""
    readme = (ROOT / "README.md").read_text()
    if section is None:
        text = readme.split("\n## ", 1)[0]
    else:
        match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
        assert match, f"README.md has no section '## {section}'"
        text = match.group(1)
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[str]:
    """Shell commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_quick_start_is_what_ci_runs():
    """The opening's two commands: `serve` (run by the `served` fixture below) and the
    install and test commands, the very lines .ci/run runs."""
    install_and_serve, install_and_test = commands(blocks(None, "bash")[0])
    torch, install, serve = install_and_serve.split(" && ")
    dev_install, test_command = install_and_test.split(" && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert serve == "cleandift serve" and ci[-1] == test_command
    for step in (torch, dev_install):
        assert any(line.startswith(step.replace("pip install", "python -m pip install -q"))
                   for line in ci), (step, ci)
    assert install.replace(",dev,ray", "") == install


@pytest.fixture(scope="module")
def served(cache_dir, tmp_path_factory) -> tuple[str, Path]:
    """`cleandift serve` (its own Redis, the demo model) and a folder with `examples/`."""
    here = tmp_path_factory.mktemp("readme")
    (here / "examples").symlink_to(ROOT / "examples")
    (here / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n")
    with serving([], cache_dir, here / "serve.log") as url:
        yield url, here


def run(line: str, url: str, cwd: Path, timeout: float = 300) -> str:
    line = line.replace("http://localhost:8000", url).replace("localhost:8000",
                                                              url.removeprefix("http://"))
    env = {**os.environ, "CURL_HOME": str(cwd),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_api_examples_run_as_pasted(served):
    url, here = served
    [block] = blocks("Calling the API", "bash")
    lines = commands(block)
    assert len(lines) >= 14 and all("localhost:8000" in line for line in lines)
    for line in lines:
        run(line, url, here)
    assert (here / "us6.npy").read_bytes().startswith(b"\x93NUMPY")
    for name in ("f.safetensors", "f32.safetensors", "g.safetensors", "q.safetensors"):
        assert (here / name).stat().st_size > 0


def test_the_python_examples_run_as_pasted(served):
    url, here = served
    snippets = blocks("Calling the API", "python") + \
        blocks("The web page and the Python client", "python")
    assert len(snippets) == 2
    for code in snippets:
        code = code.replace("http://localhost:8000", url)
        done = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"


def test_the_two_model_example_runs_as_pasted(cache_dir, tmp_path):
    """The opening's second block: `serve` with two demo models by name, then its curl line."""
    serve, *rest = commands(blocks(None, "bash")[1])
    args = shlex.split(serve, comments=True)
    assert args[:2] == ["cleandift", "serve"] and rest
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n")
    with serving(args[2:], cache_dir, tmp_path / "serve.log") as url:
        out = "".join(run(line, url, tmp_path) for line in rest)
    assert '"name":"sd15"' in out.replace(" ", "") and '"model":"sd15"' in out.replace(" ", "")


def test_the_training_example_runs_as_pasted(cache_dir, tmp_path):
    """Make data, train v1, serve the registry, train v2 beside it: the answer's version
    becomes v2 without a restart (the worker's check every 5 s finds it)."""
    block = blocks("Training a student, and serving it as it is published", "bash")[0]
    lines = commands(block)
    [serve] = [line for line in lines if line.startswith("cleandift serve")]
    before, after = lines[:lines.index(serve)], lines[lines.index(serve) + 1:]
    assert len(before) == 2 and len(after) == 2 and "train" in after[0]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".curlrc").write_text("fail-with-body\nsilent\nshow-error\n")
    for line in before:
        run(line, "http://unused", tmp_path)
    args = shlex.split(serve, comments=True)[2:]
    with serving(args, cache_dir, tmp_path / "serve.log", cwd=tmp_path) as url:
        assert run(after[1], url, tmp_path).strip() == "v1"
        run(after[0], url, tmp_path)
        deadline = time.monotonic() + 60
        while (version := run(after[1], url, tmp_path).strip()) != "v2":
            assert version == "v1" and time.monotonic() < deadline, version
            time.sleep(1)


def test_the_command_line_examples_run_as_pasted(served):
    url, here = served
    block = blocks("Command line", "bash")[0]
    lines = [line for line in commands(block) if not SKIP.match(line)]
    assert len(lines) >= 6
    for line in lines:
        run(line, url, here)
    assert (here / "feats" / "index.jsonl").is_file() and (here / "warps.json").is_file()
    run("python -c 'from cleandift.datasets import FeatureDataset as F; "
        "print(F(\"feats\")[\"cat.jpg\"].features[\"us6\"].shape)'", url, here)
