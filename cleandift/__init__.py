"""CleanDIFT features: one clean forward pass of a distilled SD UNet, read at 11 keys.

Names are imported lazily so that `cleandift --help` does not pay for torch.
"""

from importlib import import_module

_EXPORTS = {
    "Extractor": ".extractor",
    "InvalidSizeError": ".extractor",
    "ModelInfo": ".extractor",
    "ImageError": ".images",
    "decode_image": ".images",
    "CORRESPONDENCE_LAYER": ".layers",
    "LAYER_KEYS": ".layers",
    "UnknownLayerError": ".layers",
    "ModelLoadError": ".loading",
    "load_extractor": ".loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
