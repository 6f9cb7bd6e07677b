"""`extract-dataset` on Ray vs the local engine, on the same images and the same cores.

Each run is the command a user types, in a process of its own: images/s over the whole run
(Ray's start included: it is what a user waits for) and from its first committed shard
to its end (the steady state), and the driver's peak RSS, sampled every 50 ms, for a
small and a five times larger dataset (the driver holds one shard, so it must not grow).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cleandift.demo import ensure_model
from cleandift.settings import Settings

DATASET_DESCRIPTIONS = {
    "datasets_local_images_per_s": "extract-dataset, local engine, 200 images (images/s)",
    "datasets_ray_images_per_s": "the same with --engine ray, one actor (images/s)",
    "datasets_ray_vs_local": "ray / local, whole runs (Ray's start included)",
    "datasets_ray_vs_local_steady": "ray / local, first shard committed to the end",
    "datasets_ray_driver_peak_mb_200": "driver peak RSS, 200 images (MB)",
    "datasets_ray_driver_peak_mb_1000": "driver peak RSS, 1000 images (MB)",
}
SHARD = 25


def dataset_figures(quick: bool) -> dict[str, float]:
    model = str(ensure_model("bench", Settings().cache_dir))
    small, large = (100, 500) if quick else (200, 1000)
    with tempfile.TemporaryDirectory(prefix="cleandift-bench-ds-") as tmp:
        root = Path(tmp)
        images = _images(root / "images", large)
        _list(root / "small.txt", images[:small])
        _list(root / "large.txt", images)
        local = _run(root / "small.txt", root / "local", model)
        ray = _run(root / "small.txt", root / "ray", model, "--engine", "ray")
        ray_large = _run(root / "large.txt", root / "ray-large", model, "--engine", "ray")
    return {
        "datasets_local_images_per_s": small / local["wall_s"],
        "datasets_ray_images_per_s": small / ray["wall_s"],
        "datasets_ray_vs_local": local["wall_s"] / ray["wall_s"],
        "datasets_ray_vs_local_steady": local["steady_s"] / ray["steady_s"],
        f"datasets_ray_driver_peak_mb_{small}": ray["peak_mb"],
        f"datasets_ray_driver_peak_mb_{large}": ray_large["peak_mb"],
    }


def _images(folder: Path, count: int) -> list[Path]:
    import numpy as np

    from cleandift.trainer.synthetic import synthetic_image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        synthetic_image(320, rng)[0].resize((320, 240)).save(path, quality=90)
        paths.append(path)
    return paths


def _list(path: Path, images: list[Path]) -> None:
    path.write_text("".join(f"{p}\n" for p in images))


def _run(source: Path, out: Path, model: str, *more: str) -> dict[str, float]:
    """One extraction as a user runs it; wall time, steady time, driver peak RSS."""
    import psutil  # the dev extra
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "cleandift.cli", "extract-dataset", str(source), "--out",
            str(out), "--model", model, "--layers", "us6", "--shard-size", str(SHARD), *more]
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    driver, peak, first = psutil.Process(process.pid), 0, None
    while process.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if first is None and (out / "index.jsonl").exists():
            first = time.perf_counter()
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)  # Ray's leftovers
    return {"wall_s": wall, "steady_s": wall - ((first or start) - start),
            "peak_mb": peak / 1e6}
