"""Clean (CleanDIFT) and noisy-ensemble (DIFT) feature extraction on a batch of images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from .contract import ModelInfo, check_size, validate_layers
from .images import resize_rgb, to_pixels
from .layers import probe_layers, unet_features
from .method import CORRESPONDENCE_LAYER, DIFT_ENSEMBLE, DIFT_TIMESTEP, MODES, STUDENT_TIMESTEP
from .prompts import PromptEncoder

StopCheck = Callable[[], bool]


class Stopped(Exception):
    """`should_stop` said so between two UNet passes: nobody waits for the rest."""


class Extractor:
    """One loaded model: VAE encoder, UNet (student or base) and the text conditioning.

    The diffusers modules are typed `Any`: diffusers ships no type information for their
    configs and outputs, and we read both.
    """

    def __init__(
        self,
        *,
        vae: Any,
        unet: Any,
        noise_scheduler: Any,
        prompts: PromptEncoder,
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
        load_base_unet: Callable[[], nn.Module] | None = None,
        base_spec: str = "",
    ) -> None:
        self.vae: Any = vae
        self.unet: Any = unet
        self.noise_scheduler: Any = noise_scheduler
        self.prompts, self.info = prompts, info
        self.base_spec = base_spec or info.base  # where the base model loads from (a path
        # or hub id); info.base is its public name only, so answers never show local paths
        self.device, self.dtype = device, dtype
        self._load_base_unet = load_base_unet
        self._base_unet: nn.Module | None = None if load_base_unet else unet
        self._lock = threading.Lock()
        self.latent_factor: int = 2 ** (len(vae.config.block_out_channels) - 1)

    # -- stages -----------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
        """CPU stage: PIL images -> NCHW float batch in [-1, 1] at the model input size."""
        size = check_size(size or self.info.input_size)
        return to_pixels([resize_rgb(image.convert("RGB"), size) for image in images])

    @torch.inference_mode()
    def features(
        self,
        pixels: torch.Tensor,
        layers: Sequence[str] | None = None,
        prompt: str = "",
        *,
        mode: str = "clean",
        timestep: float | None = None,
        ensemble: int = DIFT_ENSEMBLE,
        seeds: Sequence[int] | None = None,
        should_stop: StopCheck | None = None,
    ) -> dict[str, torch.Tensor]:
        """Device stage: a pixel batch -> {key: [N, C, h, w]} on the model's device.
        `should_stop` is asked before the UNet and between the passes of a DIFT ensemble
        (a job whose deadline passed); True raises `Stopped`."""
        keys = validate_layers(layers, self.info.default_layers)
        pixels = self.model_input(pixels)
        check_size(pixels.shape[-1])
        context = self.prompts(prompt)
        posterior = self.vae.encode(pixels).latent_dist
        scale = self.vae.config.scaling_factor
        if mode == "clean":
            t = self.info.student_timestep if timestep is None else timestep
            latents = posterior.mean * scale
            if should_stop is not None and should_stop():
                raise Stopped
            return unet_features(self.unet, latents, self._t(t, len(pixels)), context, keys)
        if mode == "dift":
            t = DIFT_TIMESTEP if timestep is None else timestep
            return self._dift(posterior, scale, keys, context, int(t), ensemble, seeds,
                              should_stop or _never)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """NCHW in [-1, 1] on the model's device and dtype. uint8 NHWC batches (as the
        worker sends them) are converted on the device: a quarter of the bytes cross the
        bus and the CPU does no float arithmetic."""
        if pixels.dtype == torch.uint8:
            raw = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            return raw.to(self.dtype).div_(127.5).sub_(1.0)
        return pixels.to(self.device, self.dtype, non_blocking=True)

    def extract(
        self,
        images: Sequence[Image.Image],
        layers: Sequence[str] | None = None,
        size: int | None = None,
        prompt: str = "",
        **kwargs: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """All images in one batch -> one {key: [C, h, w]} dict per image, on the CPU."""
        batch = self.features(self.preprocess(images, size), layers, prompt, **kwargs)
        return [{k: v[i].float().cpu() for k, v in batch.items()} for i in range(len(images))]

    # -- DIFT baseline ----------------------------------------------------------------
    def base_unet(self) -> nn.Module:
        """The base (teacher) UNet, loaded beside the student on first use."""
        with self._lock:
            if self._base_unet is None:
                assert self._load_base_unet is not None
                self._base_unet = self._load_base_unet()
            return self._base_unet

    def _dift(self, posterior: Any, scale: float, keys: list[str], context: torch.Tensor,
              t: int, ensemble: int, seeds: Sequence[int] | None, should_stop: StopCheck
              ) -> dict[str, torch.Tensor]:
        """DIFT: average the features of `ensemble` noisy copies at timestep t.

        Each image is encoded once; members resample the latent posterior and the noise,
        which is the distribution of the reference's `ensemble` separate encodes. The
        UNet runs on a few members of every image at a time (at most max(n, ensemble)
        latents a pass), asking `should_stop` before each pass: a 17-image ensemble is 8
        passes that can be abandoned, not one that cannot.
        """
        n = posterior.mean.shape[0]
        per_image: list[int | None] = list(seeds) if seeds is not None else [None] * n
        latents, noise = [], []
        for i in range(n):
            seed = per_image[i]
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            shape = (ensemble, *posterior.mean.shape[1:])
            eps_z = torch.randn(shape, generator=gen).to(self.device, self.dtype)
            latents.append((posterior.mean[i] + posterior.std[i] * eps_z) * scale)
            noise.append(torch.randn(shape, generator=gen).to(self.device, self.dtype))
        latents_b, noise_b = torch.cat(latents), torch.cat(noise)  # image-major
        ts_all = torch.full((len(latents_b),), t, device=self.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents_b, noise_b, ts_all)
        noisy = noisy.reshape(n, ensemble, *noisy.shape[1:])
        members = max(1, max(n, ensemble) // n)  # per pass, of every image
        sums: dict[str, torch.Tensor] = {}  # float32 whatever the model's dtype
        dtypes: dict[str, torch.dtype] = {}
        for first in range(0, ensemble, members):
            if should_stop():
                raise Stopped
            chunk = noisy[:, first:first + members]
            ts = torch.full((chunk.shape[0] * chunk.shape[1],), t, device=self.device,
                            dtype=torch.long)
            feats = unet_features(self.base_unet(), chunk.flatten(0, 1), ts, context, keys)
            for k, v in feats.items():
                part = v.reshape(n, chunk.shape[1], *v.shape[1:]).sum(1, dtype=torch.float32)
                sums[k], dtypes[k] = (sums[k] + part if k in sums else part), v.dtype
        return {k: (v / ensemble).to(dtypes[k]) for k, v in sums.items()}

    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.device, dtype=torch.float32)


def _never() -> bool:
    return False


def correspondence_layer(metadata: dict[str, Any]) -> str:
    return str(metadata.get("correspondence_layer", CORRESPONDENCE_LAYER))


def default_layers(metadata: dict[str, Any]) -> list[str]:
    return list(metadata.get("default_layers", [correspondence_layer(metadata)]))


def model_info(
    *,
    name: str,
    version: str,
    base: str,
    unet_config: dict[str, Any],
    latent_factor: int,
    input_size: int,
    metadata: dict[str, Any],
) -> ModelInfo:
    """ModelInfo from the UNet config (layer shapes probed on the meta device)."""
    layers = probe_layers(dict(unet_config), input_size, latent_factor)
    corr = correspondence_layer(metadata)
    return ModelInfo(
        name=name,
        version=version,
        base=base,
        input_size=input_size,
        default_layers=default_layers(metadata),
        correspondence_layer=corr,
        layers=layers,
        student_timestep=float(metadata.get("student_timestep", STUDENT_TIMESTEP)),
    )
