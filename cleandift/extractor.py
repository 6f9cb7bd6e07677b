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
    ) -> dict[str, torch.Tensor]:
        """Device stage: a pixel batch -> {key: [N, C, h, w]} on the model's device."""
        keys = validate_layers(layers, self.info.default_layers)
        pixels = self.model_input(pixels)
        check_size(pixels.shape[-1])
        context = self.prompts(prompt)
        posterior = self.vae.encode(pixels).latent_dist
        scale = self.vae.config.scaling_factor
        if mode == "clean":
            t = self.info.student_timestep if timestep is None else timestep
            latents = posterior.mean * scale
            return unet_features(self.unet, latents, self._t(t, len(pixels)), context, keys)
        if mode == "dift":
            t = DIFT_TIMESTEP if timestep is None else timestep
            return self._dift(posterior, scale, keys, context, int(t), ensemble, seeds)
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
              t: int, ensemble: int, seeds: Sequence[int] | None) -> dict[str, torch.Tensor]:
        """DIFT: average the features of `ensemble` noisy copies at timestep t.

        Each image is encoded once; members resample the latent posterior and the noise,
        which is the distribution of the reference's `ensemble` separate encodes.
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
        latents_b, noise_b = torch.cat(latents), torch.cat(noise)
        ts = torch.full((len(latents_b),), t, device=self.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents_b, noise_b, ts)
        feats = unet_features(self.base_unet(), noisy, ts, context, keys)
        return {k: v.reshape(n, ensemble, *v.shape[1:]).mean(1) for k, v in feats.items()}

    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.device, dtype=torch.float32)


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
    corr = str(metadata.get("correspondence_layer", CORRESPONDENCE_LAYER))
    return ModelInfo(
        name=name,
        version=version,
        base=base,
        input_size=input_size,
        default_layers=list(metadata.get("default_layers", [corr])),
        correspondence_layer=corr,
        layers=layers,
        student_timestep=float(metadata.get("student_timestep", STUDENT_TIMESTEP)),
    )
