"""What the service can move, independent of the model: the shape-only worker answers
SD2.1-shaped features at 768 px (us6: 5.9 MB per image; all 11 keys: 35 MB), and clients
receive them as safetensors and load them into numpy, as the Python client does.

Reported per result path (`CLEANDIFT_RESULT_TRANSPORT`): images/s, MB/s, and the CPU
time per image of each process (API, worker, Redis, client), from /proc. The client is
an efficient one (threads, one buffer per answer, tensors read as views), so that the
figures show the service, not the client library.
"""

from __future__ import annotations

import http.client
import io
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from cleandift.client.tensors import read_safetensors

from .stack import Stack, service_stack

TICKS = os.sysconf("SC_CLK_TCK")
ALL_KEYS = "mid,us1,us2,us3,us4,us5,us6,us7,us8,us9,us10"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _processes(stack: Stack) -> dict[str, int]:
    pids = {"api": stack.api.pid if stack.api else 0, "worker": stack.workers[0].pid}
    if stack.redis is not None:
        pids["redis"] = stack.redis.pid
    return pids


def measure(stack: Stack, image: bytes, layers: str, concurrency: int, total: int
            ) -> dict[str, float]:
    threaded_client(stack.url, image, layers, concurrency, concurrency)  # warm-up
    pids = _processes(stack)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    seconds, ok = threaded_client(stack.url, image, layers, concurrency, total)
    client_s = time.process_time() - client_before
    if ok != total:
        raise RuntimeError(f"transport errors: {total - ok} of {total} answers wrong")
    sample = httpx.post(stack.url + "/features", files={"image": ("i.jpg", image)},
                        data={"layers": layers}, params={"format": "safetensors"}, timeout=60)
    per_image = {f"cpu_ms_per_image_{name}": (cpu_seconds(pid) - before[name]) / total * 1000
                 for name, pid in pids.items()}
    per_image["cpu_ms_per_image_client"] = client_s / total * 1000
    megabytes = len(sample.content) / 1e6
    return {"images_per_s": total / seconds, "mb_per_s": total / seconds * megabytes,
            "response_mb": megabytes, **per_image}


SETS = {"us6": ("us6", 160, 480), "all": (ALL_KEYS, 32, 96)}  # layers, requests quick / full
METRICS = {"images_per_s": "images/s", "mb_per_s": "MB/s of answers",
           "response_mb": "MB per answer",
           **{f"cpu_ms_per_image_{p}": f"CPU ms per image in the {p}"
              for p in ("api", "worker", "redis", "client")}}
PATHS = {"redis": "results through Redis (before)", "direct": "results worker -> API (after)",
         "camera": "worker -> API, 640x480 photo resampled by the API"}
TRANSPORT_DESCRIPTIONS = {
    f"transport_{path}_{name}_{metric}": f"{what}, {name} at 768 px, 16 clients: {unit}"
    for path, what in PATHS.items() for name in SETS for metric, unit in METRICS.items()}


def transport_figures(transport: str, quick: bool, image: bytes,
                      sets: tuple[str, ...] = tuple(SETS)) -> dict[str, float]:
    """One result path, with the shape-only worker, at 16 concurrent clients."""
    figures: dict[str, float] = {}
    with service_stack("shape-only", worker_module="cleandift.bench.shapes",
                       queue_prefix=f"transport-{transport}", result_transport=transport,
                       max_batch="16", max_queue="512") as stack:
        for name in sets:
            layers, quick_total, full_total = SETS[name]
            total = quick_total if quick else full_total
            for key, value in measure(stack, image, layers, 16, total).items():
                figures[f"transport_{transport}_{name}_{key}"] = round(value, 3)
    return figures


def bench_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG of a common camera size (upscaled to 768 by the API)."""
    import numpy as np

    from cleandift.trainer.synthetic import synthetic_image

    image = synthetic_image(max(width, height), np.random.default_rng(0))[0]
    buf = io.BytesIO()
    image.resize((width, height)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "cleandift-bench"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="i.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + image
                 + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def expected_shapes(layers: str, side: int = 768) -> dict[str, tuple[int, ...]]:
    """SD2.1's maps at `side` px (METHOD.md's table)."""
    from cleandift.architectures import SD21
    from cleandift.layers import probe_layers

    info = probe_layers(SD21.unet, side, 8)
    return {k: (info[k].channels, side // info[k].stride, side // info[k].stride)
            for k in layers.split(",")}


def threaded_client(url: str, image: bytes, layers: str, concurrency: int, total: int,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[float, int]:
    """(seconds, answers of 200) for `total` requests from `concurrency` threads, each on
    one kept-alive connection, reading every answer into one buffer and its tensors as
    views (read_safetensors): what an efficient client costs."""
    body, content_type = multipart(image, {"layers": layers})
    shapes = shapes or expected_shapes(layers)
    target = urlsplit(url)
    counter, ok, lock = iter(range(total)), [0], threading.Lock()

    def user() -> None:
        connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port,
                                                timeout=120)
        for _ in counter:
            connection.request("POST", "/features?format=safetensors", body=body,
                               headers={"Content-Type": content_type})
            response = connection.getresponse()
            data = np.empty(int(response.getheader("content-length", "0")), np.uint8)
            view, got = data.data, 0
            while got < len(data):
                n = response.readinto(view[got:])
                if not n:
                    break
                got += n
            if response.status == 200 and got == len(data):
                arrays, _, _ = read_safetensors(data)
                with lock:
                    ok[0] += {k: a.shape for k, a in arrays.items()} == shapes
        connection.close()

    threads = [threading.Thread(target=user) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, ok[0]
