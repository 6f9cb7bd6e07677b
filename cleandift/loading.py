"""Model specs -> a ready Extractor: diffusers folders, hub ids, registry versions, and a
flat UNet state dict (the published CleanDIFT weights) loaded strictly on top.

Only safetensors are read; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import official, registry
from .demo import METADATA_FILE, ensure_model
from .dtypes import torch_dtype
from .extractor import Extractor, default_layers, model_info
from .hf import HF_SCHEME, hub_file, quiet_progress_bars
from .prompts import EMPTY_PROMPT_FILE, PromptEncoder
from .settings import default_cache_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Built-in small models, created from their config and seed on first use: the SD2.1-shaped
# "demo" (the default) and the SD1.5-shaped "demo15".
BUILTIN_DEMOS = ("demo", "demo15")


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ResolvedSpec:
    """Where the base model comes from and what sits on top of it."""

    source: str  # diffusers folder or hub id
    is_hub: bool
    unet_file: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    version: str = "base"


def resolve_spec(spec: str | Path | None, cache_dir: Path, demo_seed: int = 0) -> ResolvedSpec:
    """Classify a spec; registry versions are checksum-verified here."""
    if spec is None or str(spec) in BUILTIN_DEMOS:
        kind = "demo" if spec is None else str(spec)
        return _folder_spec(ensure_model(kind, cache_dir, seed=demo_seed))
    path = Path(spec).expanduser()
    if path.is_dir() and registry.is_registry_path(path):
        try:
            version_dir = registry.resolve(path)
            manifest = registry.read_manifest(version_dir, verify=True)
        except registry.RegistryError as exc:
            raise ModelLoadError(str(exc)) from exc
        base = resolve_spec(manifest["base"], cache_dir, demo_seed)
        base.unet_file = version_dir / registry.UNET_FILE
        base.metadata = {**base.metadata, **manifest, "registry_dir": str(version_dir)}
        base.name, base.version = manifest["name"], manifest["version"]
        return base
    if path.is_dir():
        if not (path / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no unet/config.json)")
        return _folder_spec(path)
    if path.exists():
        raise ModelLoadError(f"{path} is a file; expected a diffusers folder or registry path")
    if _HUB_ID.match(str(spec)) and not str(spec).startswith((".", "/", "~")):
        return ResolvedSpec(source=str(spec), is_hub=True, name=str(spec))
    raise ModelLoadError(f"no model at {spec!r}: not a folder, registry path or hub id")


def _folder_spec(folder: Path) -> ResolvedSpec:
    meta_path = folder / METADATA_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return ResolvedSpec(
        source=str(folder.resolve()),
        is_hub=False,
        metadata=metadata,
        name=metadata.get("name", folder.name),
        version=str(metadata.get("version", "base")),
    )


def _from_pretrained(cls: Any, spec: ResolvedSpec, subfolder: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(spec.source, subfolder=subfolder, **kwargs)
    except Exception as exc:  # diffusers/hub raise many types; all mean "cannot load"
        if spec.is_hub:
            hint = (
                "hub ids need network access or an earlier download in the Hugging Face "
                "cache; offline, pass a local diffusers folder instead"
            )
        else:
            hint = "is it a complete diffusers folder?"
        raise ModelLoadError(
            f"cannot load {subfolder} of {spec.source!r}: {exc} ({hint})"
        ) from exc


def _weights(cls: Any, spec: ResolvedSpec, subfolder: str, dtype: torch.dtype) -> Any:
    """Weights from safetensors files only: a folder that has only pickles (.bin, .ckpt)
    is refused, never unpickled."""
    return _from_pretrained(cls, spec, subfolder, torch_dtype=dtype, use_safetensors=True)


def load_unet_state(unet: torch.nn.Module, path: Path) -> dict[str, str]:
    """Strictly load a flat diffusers-named safetensors state dict, or the student UNet of
    an official full checkpoint (whose learned timestep then serves); returns metadata."""
    metadata = _unet_file_metadata(path)
    try:
        if official.is_full_file(path):
            checkpoint = official.read_full(path)
            state = checkpoint.unet
            metadata["student_timestep"] = str(checkpoint.timestep)
        else:
            state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read UNet weights {path}: {exc}") from exc
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {label} key(s): {shown}")
        raise ModelLoadError(f"{path} does not fit the base UNet: " + "; ".join(parts))
    unet.load_state_dict(state, strict=True)
    return metadata


def _unet_file_metadata(path: Path) -> dict[str, str]:
    """The header metadata `load_unet_state` adds (the weights left unread)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read UNet weights {path}: {exc}") from exc


def unet_path(unet: str | Path) -> Path:
    """A local UNet file, or an `hf://OWNER/REPO/FILE` reference fetched into the
    Hugging Face cache."""
    text = str(unet)
    if not text.startswith(HF_SCHEME):
        return Path(unet)
    try:
        return Path(hub_file(text))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(str(exc)) from exc


def check_device(dev: torch.device) -> None:
    """A clear error for an accelerator this machine or PyTorch build does not have."""
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise ModelLoadError("--device mps: this PyTorch build or machine has no MPS backend "
                             "(Apple silicon, macOS 12.3+); use cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {dev}: no CUDA device is visible to PyTorch "
                             "(a CPU-only build, or no driver); use cpu")


def pick_device_dtype(
    device: str | torch.device | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA when present, else CPU (Apple's MPS when asked for); fp16 on CUDA, fp32
    elsewhere unless asked (bf16 is opt-in)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, torch_dtype(dtype)


def load_extractor(
    spec: str | Path | None = None,
    *,
    unet: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    demo_seed: int = 0,
) -> Extractor:
    """Load a model spec (and optionally a flat UNet file on top) into an Extractor."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    quiet_progress_bars()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    resolved = resolve_spec(spec, cache, demo_seed)
    dev, dt = pick_device_dtype(device, dtype)
    check_device(dev)
    unet_file = unet_path(unet) if unet is not None else resolved.unet_file
    student = _weights(UNet2DConditionModel, resolved, "unet", dt)
    metadata = dict(resolved.metadata)
    version = resolved.version
    if unet_file is not None:  # checked whole before any weight is replaced
        metadata.update(load_unet_state(student, unet_file))
        if unet is not None:  # an explicit file; registry versions are named already
            version = "unet-" + registry.sha256_file(unet_file)[:12]
    vae = _weights(AutoencoderKL, resolved, "vae", dt)
    vae.decoder = None  # features need the encoder only
    scheduler = _from_pretrained(DDPMScheduler, resolved, "scheduler")
    latent_factor, input_size = _input_size(metadata, student.config, vae.config)
    info = model_info(
        name=resolved.name,
        version=version,
        base=resolved.source if resolved.is_hub else Path(resolved.source).name,
        unet_config=student.config,
        latent_factor=latent_factor,
        input_size=input_size,
        metadata=metadata,
    )
    return Extractor(
        vae=vae.to(dev).eval().requires_grad_(False),
        unet=student.to(dev).eval().requires_grad_(False),
        noise_scheduler=scheduler,
        prompts=_prompt_encoder(resolved, dev, dt, cache),
        info=info,
        device=dev,
        dtype=dt,
        load_base_unet=_base_loader(resolved, dev, dt) if unet_file is not None else None,
        base_spec=resolved.source,
    )


@dataclass(frozen=True)
class ModelFacts:
    """What a dataset records of its model, known before any weight loads."""

    name: str
    version: str
    input_size: int
    default_layers: list[str]


def describe_model(spec: str | Path | None, *, cache_dir: str | Path | None = None,
                   demo_seed: int = 0) -> ModelFacts | None:
    """A model's facts as `load_extractor` finds them (without a --unet file), from its
    configs and the headers of its files: a process that only writes what others compute
    need not import diffusers nor hold the weights. None for a hub id (its configs come
    with loading)."""
    resolved = resolve_spec(spec, Path(cache_dir) if cache_dir else default_cache_dir(),
                            demo_seed)
    if resolved.is_hub:
        return None
    metadata = dict(resolved.metadata)
    if resolved.unet_file is not None:  # a registry version's UNet
        metadata.update(_unet_file_metadata(resolved.unet_file))
    folder = Path(resolved.source)
    try:
        configs = [json.loads((folder / part / "config.json").read_text())
                   for part in ("unet", "vae")]
        _, input_size = _input_size(metadata, *configs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the configs of {folder}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return ModelFacts(name=resolved.name, version=resolved.version, input_size=input_size,
                      default_layers=default_layers(metadata))


def _input_size(metadata: dict[str, Any], unet_config: Any, vae_config: Any
                ) -> tuple[int, int]:
    """(latent factor, the model's input size); configs as dicts or diffusers configs."""
    latent_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return latent_factor, int(metadata.get("input_size",
                                           unet_config["sample_size"] * latent_factor))


def _base_loader(
    resolved: ResolvedSpec, dev: torch.device, dt: torch.dtype
) -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        unet: torch.nn.Module = _weights(UNet2DConditionModel, resolved, "unet", dt)
        return unet.to(dev).eval().requires_grad_(False)

    return load


def _prompt_encoder(
    resolved: ResolvedSpec, dev: torch.device, dt: torch.dtype, cache_dir: Path
) -> PromptEncoder:
    def load_text() -> tuple[Any, torch.nn.Module]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = _from_pretrained(CLIPTokenizer, resolved, "tokenizer")
        encoder = _weights(CLIPTextModel, resolved, "text_encoder", dt)
        return tokenizer, encoder.to(dev).eval().requires_grad_(False)

    key = hashlib.sha256(resolved.source.encode()).hexdigest()[:16]
    cache = cache_dir / "prompts" / f"{key}.safetensors"
    files = [cache]
    if not resolved.is_hub:
        files.insert(0, Path(resolved.source) / EMPTY_PROMPT_FILE)
    return PromptEncoder(load_text, device=dev, dtype=dt, empty_cache_files=files)
