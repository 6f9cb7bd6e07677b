"""`cleandift extract-dataset --service URL`: a running service computes, the command
writes the same dataset format as a local run."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cleandift.cli import app
from cleandift.datasets import FeatureDataset
from tests.cleandift.test_bulk import write_folder
from tests.service.service_helpers import running_service


@pytest.mark.parametrize("mode", ["clean", "dift"])
def test_through_a_service_equals_local_extraction(settings, extractor, demo_dir, tmp_path,
                                                   mode):
    """DIFT too: both sides seed each image's noise from the same digest of its pixels."""
    root = write_folder(tmp_path / "images", 5)
    common = ["--layers", "us6", "--size", "64", "--shard-size", "4", "--mode", mode]
    with running_service(settings, extractor) as (client, _):
        remote = CliRunner().invoke(app, ["extract-dataset", str(root), "--out",
                                          str(tmp_path / "remote"), "--service",
                                          str(client.base_url), "--concurrency", "3", *common])
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(app, ["extract-dataset", str(root), "--out",
                                     str(tmp_path / "local"), "--model", str(demo_dir), *common])
    assert local.exit_code == 0, local.output
    a, b = FeatureDataset(tmp_path / "remote"), FeatureDataset(tmp_path / "local")
    assert a.keys() == b.keys() and len(a) == 5
    assert [e["key"] for e in a.errors] == [e["key"] for e in b.errors] == ["b/zz-corrupt.jpg"]
    assert a.errors[0]["error"].startswith("400")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.features["us6"].float(), y.features["us6"].float(),
                                   atol=2e-3, rtol=1e-2)
        assert x.meta["image_size"] == y.meta["image_size"]


def test_a_model_change_during_a_run_stops_it(settings, extractor, jpeg):
    """A hot reload mid-run would mix versions in one dataset: the run stops instead."""
    from cleandift.client import Client
    from cleandift.contract import UsageError
    from cleandift.datasets.bulk import Options
    from cleandift.datasets.compute import service_compute

    options = Options(source="-", layers=["us6"], size=64)
    with running_service(settings, extractor) as (client, _), Client(str(client.base_url)) as c:
        ok = service_compute(c, options, 2, extractor.info.version)([jpeg])
        assert ok[0][0]["us6"].shape == (64, 4, 4)
        with pytest.raises(UsageError, match="one version"):
            service_compute(c, options, 2, "v-before-a-reload")([jpeg])
