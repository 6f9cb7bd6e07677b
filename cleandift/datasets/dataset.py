"""Reading what `cleandift extract-dataset` wrote: sharded safetensors and their index.

The folder holds `manifest.json` (how the features were made), `shard-NNNNN.safetensors`
(tensors named `ENTRY/LAYER`, ENTRY the item's position in its shard) and `index.jsonl`
(one line per input, in input order: its key, shard, entry, shapes and model version, or
the error that kept it out). A shard and its index lines are committed together, so
whatever is in the index is complete.

    from cleandift.datasets import FeatureDataset
    data = FeatureDataset("feats/")          # a torch-style Dataset over the items
    item = data["cats/001.jpg"]              # or data[0]; item.features["us6"] is a tensor
    for item in data: ...                    # shard by shard, one file open at a time
    data = FeatureDataset("s3://bucket/feats")  # any fsspec URL (index under index.d/)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .storage import INDEX, MANIFEST, open_store

__all__ = ["INDEX", "MANIFEST", "SHARD", "SCALE", "FeatureDataset", "Item", "read_index",
           "tensor_name"]

SHARD = "shard-{:05d}.safetensors"
SCALE = "scale"  # int8 maps: per-channel float32 scales under ENTRY/LAYER.scale


def tensor_name(entry: int, layer: str, suffix: str = "") -> str:
    return f"{entry:06d}/{layer}{'.' + suffix if suffix else ''}"


@dataclass
class Item:
    key: str
    features: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def read_index(folder: str | Path) -> list[dict[str, Any]]:
    return open_store(folder).read_index()


class FeatureDataset:
    """The extracted items (errors left out), by position or by key. `dequantize` turns
    int8 maps back into float32 with their scales."""

    def __init__(self, folder: str | Path, layers: list[str] | None = None,
                 dequantize: bool = True) -> None:
        self.store = open_store(folder)
        manifest = self.store.read_text(MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a feature dataset")
        self.manifest = json.loads(manifest)
        index = self.store.read_index()
        self.rows = [row for row in index if "error" not in row]
        self.errors = [row for row in index if "error" in row]
        self.layers = layers or list(self.manifest["layers"])
        self.dequantize = dequantize
        self._by_key = {row["key"]: i for i, row in enumerate(self.rows)}
        self._open: tuple[str, Any] | None = None  # the last shard read by position or key

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str]:
        return [row["key"] for row in self.rows]

    def __getitem__(self, which: int | str) -> Item:
        row = self.rows[self._by_key[which] if isinstance(which, str) else which]
        return self._item(self._shard(row["shard"]), row)

    def _shard(self, name: str) -> Any:
        """Kept open for the next item: items are mostly read in order (a DataLoader
        without shuffling), and at a URL a shard is one download."""
        if self._open is None or self._open[0] != name:
            self._open = (name, self.store.tensors(name))
        return self._open[1]

    def __iter__(self) -> Iterator[Item]:
        shard, handle = None, None
        try:
            for row in self.rows:
                if row["shard"] != shard:
                    shard = row["shard"]
                    handle = self.store.tensors(shard)
                yield self._item(handle, row)
        finally:
            del handle

    def _item(self, fh: Any, row: dict[str, Any]) -> Item:
        features = {}
        for layer in self.layers:
            value = fh.get_tensor(tensor_name(row["entry"], layer))
            if value.dtype == torch.int8 and self.dequantize:
                scale = fh.get_tensor(tensor_name(row["entry"], layer, SCALE))
                value = value.float() * scale.view(-1, *([1] * (value.dim() - 1)))
            features[layer] = value
        meta = {k: v for k, v in row.items() if k not in ("key", "shard", "entry")}
        return Item(row["key"], features, meta)
