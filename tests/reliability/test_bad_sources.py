"""`extract-dataset` reads every input within bounds: a URL in total time and bytes, a
path only if it is a regular file of bounded size. Each bad input becomes one error row;
none aborts or hangs the run."""

from __future__ import annotations

import json
import time

import pytest
from tqdm import tqdm
from typer.testing import CliRunner

from cleandift.cli import app
from cleandift.datasets.dataset import read_index
from cleandift.datasets.sources import ItemError, ReadLimits, Record, read_image_bytes
from tests.corpus import BadServer, bad_sources, encode, textured_image

pytestmark = pytest.mark.integration
IMAGE = encode(textured_image(96, 64, seed=3), "JPEG")
LIMITS = ReadLimits(max_bytes=8 << 20, fetch_timeout_s=1.5)


@pytest.fixture
def server():
    with BadServer(IMAGE, interval=0.3) as bad:
        yield bad


@pytest.mark.parametrize("path, why", [("/endless", "more than 8388608 bytes"),
                                       ("/trickle", "took over 1.5 s"),
                                       ("/slow-headers", "took over 1.5 s")])
def test_a_url_is_bounded_in_bytes_and_in_total_time(server, path, why):
    start = time.monotonic()
    with pytest.raises(ItemError, match=why):
        read_image_bytes(Record(server.url + path, ""), LIMITS)
    assert time.monotonic() - start < LIMITS.fetch_timeout_s + 1.0
    assert read_image_bytes(Record(server.url + "/good.jpg", ""), LIMITS) == IMAGE


def test_paths_must_be_regular_files_of_bounded_size(tmp_path, server):
    entries = bad_sources(tmp_path, server.url)
    for name in ("/dev/zero", "a FIFO", "a folder"):
        with pytest.raises(ItemError, match="not a regular file"):
            read_image_bytes(Record(entries[name], ""), LIMITS)  # returns at once
    with pytest.raises(ItemError, match="3221225472 bytes; the limit is"):
        read_image_bytes(Record(entries["a 3 GiB file"], ""))  # the default limit too
    with pytest.raises(ItemError, match="cannot fetch http://\\[::1:bad"):
        read_image_bytes(Record(entries["malformed URL"], ""))


def test_a_run_over_bad_inputs_gives_one_error_row_each(tmp_path, demo_dir, server, record,
                                                       monkeypatch):
    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # its thread would outlive the test
    entries = bad_sources(tmp_path, server.url)
    (tmp_path / "good.jpg").write_bytes(IMAGE)
    good = {"a good file": str(tmp_path / "good.jpg"), "a good URL": server.url + "/good.jpg"}
    listed = {**good, **entries}
    (tmp_path / "list.txt").write_text("\n".join(listed.values()) + "\n")
    start = time.monotonic()
    result = CliRunner().invoke(app, [
        "extract-dataset", str(tmp_path / "list.txt"), "--out", str(tmp_path / "out"),
        "--layers", "us6", "--size", "64", "--shard-size", "4", "--batch-size", "2",
        "--fetch-timeout", "1.5", "--model", str(demo_dir)])
    took = time.monotonic() - start
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    rows = read_index(tmp_path / "out")
    assert [row["key"] for row in rows] == list(listed.values())
    errors = {name: row.get("error") for name, row in zip(listed, rows)}
    assert [name for name, error in errors.items() if error is None] == list(good)
    assert counts == {"items": len(listed), "resumed_after": 0, "failed": len(entries)}
    assert took < 60, took
    record(fault=f"extract-dataset over a list of {len(entries)} bad inputs and "
                 f"{len(good)} good ones (--fetch-timeout 1.5)", sent=len(listed),
           succeeded=len(good), refused=len(entries), errors=0, lost=0,
           notes=f"finished in {took:.1f} s (model load included), one error row each: "
                 + "; ".join(f"{name}: {_reason(errors[name], entries[name])}"
                             for name in entries))


def _reason(error: str, entry: str) -> str:
    """The error without the entry's own text (paths, URLs), for the report."""
    for prefix in (f"cannot fetch {entry}: ", f"{entry}: "):
        error = error.removeprefix(prefix)
    return error.replace(f": '{entry}'", "").replace(entry, "it")
