"""Text conditioning with the text encoder loaded only when a new prompt needs it.

Almost every request uses the empty prompt, whose embedding is read from the model folder
or a cache file, so a worker normally never holds the text encoder in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMPTY_PROMPT_FILE = "empty_prompt_embeds.safetensors"

TextEncoderLoader = Callable[[], tuple[object, torch.nn.Module]]


class PromptEncoder:
    """Prompt -> [1, 77, D] embedding on the model's device, with a small LRU cache."""

    def __init__(
        self,
        load_text_encoder: TextEncoderLoader,
        *,
        device: torch.device,
        dtype: torch.dtype,
        empty_cache_files: list[Path],
        cache_size: int = 64,
    ) -> None:
        self._load = load_text_encoder
        self._device = device
        self._dtype = dtype
        self._empty_files = empty_cache_files
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._encoder: tuple[object, torch.nn.Module] | None = None

    def __call__(self, prompt: str = "") -> torch.Tensor:
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
            embeds = self._empty() if prompt == "" else self._encode(prompt)
            with torch.inference_mode(False):  # a normal tensor: training reuses the cache
                embeds = embeds.to(self._device, self._dtype).clone()
            self._cache[prompt] = embeds
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return embeds

    @property
    def text_encoder_loaded(self) -> bool:
        return self._encoder is not None

    def _empty(self) -> torch.Tensor:
        for path in self._empty_files:
            if path.is_file():
                return load_file(str(path))["embeds"]
        embeds = self._encode("")
        target = self._empty_files[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        save_file({"embeds": embeds.float().cpu().contiguous()}, str(tmp))
        tmp.replace(target)
        return embeds

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = self._load()
        tokenizer, encoder = self._encoder
        ids = tokenizer(  # type: ignore[operator]
            [prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(encoder.parameters()).device
        embeds: torch.Tensor = encoder(ids.to(device))[0].float().cpu()
        return embeds
