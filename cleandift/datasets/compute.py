"""Where `extract-dataset` gets its features: a model loaded here, or a running service.

Both return, per image, its maps at the model input size (layer -> [C, h, w]) and its
original (width, height), or the reason it could not be used (an undecodable image is an
error row, not the end of the run).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..contract import UsageError
from ..images import ImageError, decode_for_model, noise_seed, pixels_digest
from .bulk import Compute, Options, Result
from .sources import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from ..client.session import Client
    from ..extractor import Extractor

def local_compute(extractor: Extractor, options: Options) -> Compute:
    def compute(images: list[bytes]) -> list[Result]:
        results: list[Result] = []
        decoded: list[tuple[int, np.ndarray, tuple[int, int]]] = []
        for i, data in enumerate(images):
            try:
                pixels, size = decode_for_model(data, options.size, max_bytes=MAX_IMAGE_BYTES,
                                                max_pixels=MAX_IMAGE_PIXELS)
                decoded.append((i, pixels, size))
                results.append("")
            except ImageError as exc:
                results.append(str(exc))
        if decoded:
            batch = torch.from_numpy(np.stack([p for _, p, _ in decoded]))
            seeds = ([noise_seed(pixels_digest(p)) for _, p, _ in decoded]
                     if options.mode == "dift" else None)
            with torch.inference_mode():
                feats = extractor.features(batch, options.layers, options.prompt,
                                           mode=options.mode, seeds=seeds)
            for row, (i, _, size) in enumerate(decoded):
                results[i] = ({k: v[row].float().cpu() for k, v in feats.items()}, size)
        return results

    return compute


def service_compute(client: Client, options: Options, concurrency: int,
                    model_version: str) -> Compute:
    """`concurrency` requests in flight; the client retries 429/503 after Retry-After.
    A dataset holds one model version: if the service's changes (a hot reload), the run
    stops with what it committed, and a new --out takes the new version."""
    from ..client.wire import BadImage, InvalidParameters, TooLarge, UnsupportedMediaType

    wire_dtype = options.dtype if options.dtype in ("float16", "bfloat16") else "float32"
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))

    def one(data: bytes) -> Result:
        try:
            answer = client.features(data, options.layers, size=options.size,
                                     prompt=options.prompt, dtype=wire_dtype,
                                     mode=options.mode, grid=options.grid)
        except (BadImage, TooLarge, UnsupportedMediaType, InvalidParameters) as exc:
            return f"{exc.status}: {exc.detail}"
        if answer.model_version != model_version:
            raise UsageError(f"the service now serves {answer.model_version}, not "
                             f"{model_version}: this dataset holds one version (the items "
                             "committed so far are kept); extract into a new --out")
        maps = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in answer.items()}
        return maps, answer.image_size

    def compute(images: list[bytes]) -> list[Result]:
        return list(pool.map(one, images))

    return compute
