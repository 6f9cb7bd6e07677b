"""Clean (CleanDIFT) and noisy-ensemble (DIFT) feature extraction on a batch of images."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torch import nn

from .contract import InvalidSizeError, check_size  # noqa: F401  (re-exported)
from .images import resize_rgb, to_pixels
from .layers import LayerInfo, probe_layers, unet_features, validate_layers
from .prompts import PromptEncoder

DIFT_TIMESTEP = 261
DIFT_ENSEMBLE = 8
MODES = ("clean", "dift")


@dataclass
class ModelInfo:
    """What clients see of the served model (GET /v1/models)."""

    name: str
    version: str
    base: str
    input_size: int
    default_layers: list[str]
    correspondence_layer: str
    layers: dict[str, LayerInfo]
    student_timestep: float = 261.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        return data


class Extractor:
    """One loaded model: VAE encoder, UNet (student or base) and the text conditioning."""

    def __init__(
        self,
        *,
        vae: nn.Module,
        unet: nn.Module,
        noise_scheduler: object,
        prompts: PromptEncoder,
        info: ModelInfo,
        device: torch.device,
        dtype: torch.dtype,
        load_base_unet: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.vae, self.unet, self.noise_scheduler = vae, unet, noise_scheduler
        self.prompts, self.info = prompts, info
        self.device, self.dtype = device, dtype
        self._load_base_unet = load_base_unet
        self._base_unet: nn.Module | None = None if load_base_unet else unet
        self._lock = threading.Lock()
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)

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
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
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

    def extract(
        self,
        images: Sequence[Image.Image],
        layers: Sequence[str] | None = None,
        size: int | None = None,
        prompt: str = "",
        **kwargs,
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

    def _dift(self, posterior, scale, keys, context, t, ensemble, seeds):
        """DIFT: average the features of `ensemble` noisy copies at timestep t.

        Each image is encoded once; members resample the latent posterior and the noise,
        which is the distribution of the reference's `ensemble` separate encodes.
        """
        n = posterior.mean.shape[0]
        seeds = list(seeds) if seeds is not None else [None] * n
        latents, noise = [], []
        for i in range(n):
            gen = torch.Generator().manual_seed(seeds[i]) if seeds[i] is not None else None
            shape = (ensemble, *posterior.mean.shape[1:])
            eps_z = torch.randn(shape, generator=gen).to(self.device, self.dtype)
            latents.append((posterior.mean[i] + posterior.std[i] * eps_z) * scale)
            noise.append(torch.randn(shape, generator=gen).to(self.device, self.dtype))
        latents_b, noise_b = torch.cat(latents), torch.cat(noise)
        ts = torch.full((len(latents_b),), t, device=self.device, dtype=torch.long)
        noisy = self.noise_scheduler.add_noise(latents_b, noise_b, ts)
        feats = unet_features(self.base_unet(), noisy, ts, context, keys)
        return {k: v.unflatten(0, (n, ensemble)).mean(1) for k, v in feats.items()}

    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.device, dtype=torch.float32)


def model_info(
    *,
    name: str,
    version: str,
    base: str,
    unet_config: dict,
    latent_factor: int,
    input_size: int,
    metadata: dict,
) -> ModelInfo:
    """ModelInfo from the UNet config (layer shapes probed on the meta device)."""
    layers = probe_layers(dict(unet_config), input_size, latent_factor)
    corr = metadata.get("correspondence_layer", "us6")
    return ModelInfo(
        name=name,
        version=version,
        base=base,
        input_size=input_size,
        default_layers=list(metadata.get("default_layers", [corr])),
        correspondence_layer=corr,
        layers=layers,
        student_timestep=float(metadata.get("student_timestep", 261.0)),
    )
