"""CleanDIFT features: one clean forward pass of a distilled SD UNet, read at 11 keys.

Names are imported lazily so that `cleandift --help` does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cleandift-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Extractor": ".extractor",
    "ModelInfo": ".contract",
    "RequestError": ".contract",
    "InvalidSizeError": ".contract",
    "UnknownLayerError": ".contract",
    "ImageError": ".images",
    "decode_image": ".images",
    "CORRESPONDENCE_LAYER": ".method",
    "LAYER_KEYS": ".method",
    "ModelLoadError": ".loading",
    "load_extractor": ".loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
