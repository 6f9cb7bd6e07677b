"""The benchmark's measurements on the demo model: right shape of answer and FLOP ratios
that follow from the method (no assertion on wall time)."""

import math

import pytest

from cleandift.bench import measure
from cleandift.bench.cpu import DESCRIPTIONS, bench_images, table
from cleandift.bench.load import features_request, run_load
from tests.corpus import encode
from tests.service.service_helpers import running_service


@pytest.fixture(scope="module")
def images():
    return bench_images(4)


@pytest.mark.slow  # FLOP counting of every layer: about 20 s
def test_flop_ratios_follow_the_method(extractor, images):
    dift = measure.clean_vs_dift(extractor, images, repeats=1)
    # Our DIFT: 1 VAE + 8 UNet passes; DIFT's recipe: 8 VAE + 8 UNet; clean: 1 + 1.
    assert dift["clean_vs_dift8_reference_flops"] == pytest.approx(8.0, rel=1e-3)
    assert 1.0 < dift["clean_vs_dift8_flops"] < 8.0
    trunc = measure.truncation(extractor, images, batch=1, repeats=1)
    assert trunc["truncated_vs_full_us6_flops"] > 1.0
    train = measure.train_once_vs_thrice(extractor, images, batch=1, repeats=1)
    assert 1.0 < train["train_once_vs_thrice_flops"] < 3.0
    for value in (*dift.values(), *trunc.values(), *train.values()):
        assert math.isfinite(value) and value > 0


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_response_formats_and_raw_throughput(extractor, images):
    formats = measure.response_formats(extractor, images[0], repeats=1)
    assert formats["json_vs_safetensors_bytes"] == pytest.approx(4 / 3, rel=0.02)  # base64
    raw = measure.raw_throughput(extractor, images, [1, 2], repeats=1)
    assert set(raw) == {1, 2} and all(v > 0 for v in raw.values())


def test_table_lists_every_figure():
    figures = dict.fromkeys(DESCRIPTIONS, 1.0)
    assert table(figures).count("\n") == len(DESCRIPTIONS) - 1


@pytest.mark.integration
def test_load_generator_counts_statuses_over_processes(settings, extractor, photo):
    with running_service(settings, extractor) as (client, _):
        url = str(client.base_url)
        result = run_load(url, features_request(encode(photo, "JPEG")), concurrency=4,
                          total=10, processes=2)
        bad = run_load(url, features_request(b"not an image"), concurrency=2, total=4)
    assert result.ok == 10 and len(result.latencies_s) == 10 and result.throughput() > 0
    assert bad.statuses == [400] * 4 and bad.ok == 0


@pytest.mark.slow  # the GPU script's phases on the CPU: about 11 s
def test_gpu_script_runs_its_phases_on_cpu(tmp_path, cache_dir):
    """bench/gpu.py end to end on the demo architecture (the GPU run uses SD2.1)."""
    import json

    from cleandift.bench.gpu import main

    out = tmp_path / "gpu.json"
    main(["--json", str(out), "--arch", "demo", "--device", "cpu", "--workdir",
          str(tmp_path / "models"), "--batches", "1,2", "--train-batch", "1", "--quick",
          "--phases", "profile,eager,trainer"])
    report = json.loads(out.read_text())
    assert "errors" not in report, report.get("errors")
    assert [r["batch"] for r in report["extractor"]] == [1, 2]
    assert report["train_once_vs_thrice"] > 0
    assert report["flops_per_image_tflop"] > 0
    vae = report["profile_vae"]  # the op families add up to the whole
    assert vae["conv"] > 0 and sum(v for k, v in vae.items() if k.endswith("_share")) == \
        pytest.approx(1.0, abs=0.01)


@pytest.mark.integration
def test_transport_measures_real_shapes_through_the_real_stack():
    """The shape-only worker answers SD2.1's us6 at 768 (5.9 MB) through the real API,
    Redis and HTTP; the client checks every tensor's shape."""
    from cleandift.bench.stack import service_stack
    from cleandift.bench.transport import bench_jpeg, measure

    with service_stack("shape-only", worker_module="cleandift.bench.shapes",
                       queue_prefix="transport-test") as stack:
        figures = measure(stack, bench_jpeg(768, 768), "us6", 4, 8)
    assert figures["response_mb"] == pytest.approx(1280 * 48 * 48 * 2 / 1e6, rel=0.01)
    assert figures["images_per_s"] > 0
    assert {"cpu_ms_per_image_api", "cpu_ms_per_image_worker", "cpu_ms_per_image_redis",
            "cpu_ms_per_image_client"} <= set(figures)


def test_the_shape_only_extractor_is_unreachable_from_the_service():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "service"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                assert not any("bench" in n for n in names), f"{path} imports {names}"


@pytest.mark.integration
def test_output_and_cache_figures_on_the_real_stack(demo_dir, images):
    """Sizes follow from the shapes (demo us6 at 256 px: 64 x 16 x 16); the cache part
    really hits (the worker's counters would show a forward per request otherwise)."""
    from cleandift.bench.outputs import cache_figures, output_figures

    figures = output_figures(str(demo_dir), encode(images[0], "JPEG"), total=4, side=256)
    full = 64 * 16 * 16 * 2
    assert full < figures["outputs_full_bytes"] < full + 1024
    assert 100 * 64 * 2 < figures["outputs_points100_bytes"] < 100 * 64 * 2 + 1024
    assert figures["outputs_full_vs_int8_bytes"] == pytest.approx(2, rel=0.1)
    assert all(figures[f"outputs_{v}_images_per_s"] > 0 for v in ("full", "grid16", "int8"))
    cache = cache_figures(str(demo_dir), [encode(im, "JPEG") for im in images], hits=12)
    assert cache["cache_hit_requests_per_s"] > 0 and cache["cache_miss_requests_per_s"] > 0
