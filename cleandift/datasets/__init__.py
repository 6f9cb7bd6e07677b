"""The datasets side: features of whole datasets, and reading them back.

`sources` lists a folder, a list file or tar shards (local or at an fsspec URL) as records
in a fixed order; `fetch` reads URLs within bounds; `bulk` writes sharded safetensors and
their index through `storage` (a local folder or a URL), resumable; `compute` computes a
batch with a local model or a running service; `ray_engine` does the same on Ray Data;
`cli` is `cleandift extract-dataset`; `dataset` reads the result:

    from cleandift.datasets import FeatureDataset
    data = FeatureDataset("feats/")          # or "s3://bucket/feats"
    item = data["cats/001.jpg"]              # Item(key, features, meta)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dataset import FeatureDataset, Item, read_index

__all__ = ["FeatureDataset", "Item", "read_index"]


def __getattr__(name: str) -> Any:
    """The reader on first use: importing the package (the CLI does) costs no torch."""
    if name in __all__:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
