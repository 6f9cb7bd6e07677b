"""A shape-only extractor and its worker, to measure what the service can move.

`ShapeOnlyExtractor` answers with feature tensors of a real architecture's shapes (SD2.1
at 768 px: us6 is 1280 x 48 x 48) in float16, as a GPU worker would, without computing
them. With it the benchmark measures the ceiling of the API + queue + HTTP + client path,
independent of the model. It lives here, in bench/, and only
`python -m cleandift.bench.shapes worker` runs it: `cleandift serve` never can.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from PIL import Image

from cleandift.architectures import SD21, Architecture
from cleandift.contract import ModelInfo, validate_layers
from cleandift.images import resize_rgb, to_pixels
from cleandift.layers import probe_layers
from cleandift.method import CORRESPONDENCE_LAYER

if TYPE_CHECKING:
    from cleandift.extractor import Extractor


class ShapeOnlyExtractor:
    """Duck-types `cleandift.extractor.Extractor` for the worker: same attributes, same
    `features` signature; the tensors are random numbers drawn once and reused."""

    def __init__(self, arch: Architecture = SD21, input_size: int | None = None) -> None:
        size = input_size or arch.input_size
        self.device, self.dtype = torch.device("cpu"), torch.float16
        self.info = ModelInfo(name=f"{arch.name}-shapes", version="shape-only", base=arch.name,
                              input_size=size, default_layers=[CORRESPONDENCE_LAYER],
                              correspondence_layer=CORRESPONDENCE_LAYER,
                              layers=probe_layers(arch.unet, size, 8))
        self.base_spec = arch.name
        self._maps: dict[tuple[str, int], torch.Tensor] = {}

    def features(self, pixels: torch.Tensor, layers: Sequence[str] | None = None,
                 prompt: str = "", **_options: Any) -> dict[str, torch.Tensor]:
        keys = validate_layers(layers, self.info.default_layers)
        side = pixels.shape[1] if pixels.dtype == torch.uint8 else pixels.shape[-1]  # NHWC
        return {k: self._map(k, side)[: len(pixels)].expand(len(pixels), -1, -1, -1)
                for k in keys}

    def extract(self, images: Sequence[Image.Image], layers: Sequence[str] | None = None,
                size: int | None = None, prompt: str = "", **options: Any
                ) -> list[dict[str, torch.Tensor]]:
        side = size or self.info.input_size
        pixels = to_pixels([resize_rgb(image.convert("RGB"), side) for image in images])
        batch = self.features(pixels, layers, prompt, **options)
        return [{k: v[i].float() for k, v in batch.items()} for i in range(len(images))]

    def _map(self, key: str, side: int) -> torch.Tensor:
        if (key, side) not in self._maps:
            layer = self.info.layers[key]
            cells = side // layer.stride
            self._maps[key, side] = torch.randn(1, layer.channels, cells, cells,
                                                dtype=self.dtype)
        return self._maps[key, side]


def main(argv: list[str]) -> None:
    """`python -m cleandift.bench.shapes worker`: a worker process with this extractor."""
    from cleandift.service.processes.launch_worker import run_worker
    from cleandift.settings import Settings

    if argv[1:] != ["worker"]:
        raise SystemExit("usage: python -m cleandift.bench.shapes worker")
    run_worker(Settings(), cast("Extractor", ShapeOnlyExtractor()))  # duck-typed


if __name__ == "__main__":
    main(sys.argv)
