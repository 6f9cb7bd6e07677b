"""`cleandift extract-dataset`: features of every image of a folder, list or shard set,
written as sharded safetensors with an index (format and loader: `cleandift.datasets.dataset`).

Streaming and resumable by construction: items are taken in input order, a shard's worth
at a time (memory: one shard), and a shard is committed (its file, then its index lines:
`storage.py`) only when whole; the output may be a local folder or an fsspec URL. A
killed run leaves at most a stray temporary file; run again, it skips the committed items
and continues at the next shard, with the same batches as an uninterrupted run, so the
output is byte-identical.

The features come from a local model, or from a running service (`--service URL`) with
several requests in flight (429 and Retry-After honoured by the client), so a GPU fleet
does the work.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..contract import UsageError
from ..dtypes import torch_dtype
from ..reduce import pooled, quantize_int8
from .dataset import MANIFEST, SCALE, SHARD, tensor_name
from .sources import ReadLimits, Record, load_records, read_image_bytes
from .storage import Store, open_store


@dataclass(frozen=True)
class Options:
    """What the features are; a resumed run must ask for the same."""

    source: str
    layers: list[str]
    size: int
    dtype: str = "float16"  # float16, bfloat16, float32 or int8
    grid: int | None = None
    mode: str = "clean"
    prompt: str = ""
    shard_size: int = 256
    batch_size: int = 8


# Features of one image (layer -> [C, h, w]) and its (width, height), or why it failed.
Result = tuple[dict[str, torch.Tensor], tuple[int, int]] | str
# The encoded images of one batch -> one result each, in order.
Compute = Callable[[list[bytes]], list[Result]]


@dataclass
class Outcome:
    key: str
    features: dict[str, torch.Tensor] | None = None
    image_size: tuple[int, int] | None = None
    error: str | None = None


def _manifest(options: Options, model: dict[str, str]) -> dict[str, Any]:
    return {"options": asdict(options), "model": model, "layers": options.layers,
            "format": 1}


def prepare_folder(out: Store, options: Options, model: dict[str, str]
                   ) -> list[dict[str, Any]]:
    """Reopen the output (or find it new); returns the committed index rows. Only a
    committed shard ties the folder to its manifest's options and model: the manifest is
    written just before the first shard (`commit_shard`), so a run that fails before that
    shard is committed (a model its actors cannot load, a service that is down, a full
    disk) leaves the same --out free for the next try, whatever model it uses."""
    out.drop_strays()
    committed = out.read_index()
    text = out.read_text(MANIFEST)
    if committed and text is None:
        raise UsageError(f"{out.location} holds committed features but no {MANIFEST}: "
                         "use another --out")
    if committed and text is not None:
        before = json.loads(text)
        if before["options"] != asdict(options) or before["model"] != model:
            raise UsageError(f"{out.location} holds features made differently "
                             f"({before['options']}, {before['model']}); use another --out "
                             "or the same options")
    return committed


def shard_outcomes(records: Sequence[Record], options: Options, compute: Compute,
                   limits: ReadLimits = ReadLimits()) -> list[Outcome]:
    """Read a shard's images within `limits` (failures become error rows) and compute them
    in batches that start at the shard's first item, so a resumed run batches identically."""
    outcomes = [Outcome(r.key) for r in records]
    readable: list[tuple[int, bytes]] = []
    for i, record in enumerate(records):
        try:
            readable.append((i, read_image_bytes(record, limits)))
        except OSError as exc:  # every failure to read one item (sources.ItemError)
            outcomes[i].error = str(exc) or type(exc).__name__
    for start in range(0, len(readable), options.batch_size):
        chunk = readable[start:start + options.batch_size]
        for (i, _), result in zip(chunk, compute([data for _, data in chunk])):
            if isinstance(result, str):
                outcomes[i].error = result
            else:
                outcomes[i].features, outcomes[i].image_size = result
    return outcomes


def reduce_map(feat: torch.Tensor, options: Options) -> dict[str, torch.Tensor]:
    """One layer of one image as stored: pooled to the grid, in the output dtype."""
    value = pooled(feat, options.grid) if options.grid else feat.float()
    if options.dtype == "int8":
        quantized, scale = quantize_int8(value, channel_axis=0)
        return {"": quantized, SCALE: scale}
    return {"": value.to(torch_dtype(options.dtype)).contiguous()}


def commit_shard(out: Store, number: int, outcomes: list[Outcome], options: Options,
                 model: dict[str, str]) -> None:
    """The shard's tensors and index rows, committed together (`Store.commit`)."""
    tensors: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    name = SHARD.format(number)
    if number == 0:  # how every shard is made, written before the first is committed
        out.write_text(MANIFEST, json.dumps(_manifest(options, model), indent=2,
                                            sort_keys=True) + "\n")
    for entry, outcome in enumerate(outcomes):
        if outcome.features is None:
            rows.append({"key": outcome.key, "error": outcome.error})
            continue
        shapes = {}
        for layer in options.layers:
            for suffix, value in reduce_map(outcome.features[layer], options).items():
                tensors[tensor_name(entry, layer, suffix)] = value
            shapes[layer] = list(tensors[tensor_name(entry, layer)].shape)
        rows.append({"key": outcome.key, "shard": name, "entry": entry, "shapes": shapes,
                     "image_size": list(outcome.image_size or ()), **model})
    out.commit(name, tensors, {"model_version": model["model_version"]}, rows)


def open_output(location: str | Path, options: Options, model: dict[str, str],
                records: list[Record] | None = None
                ) -> tuple[Store, list[Record], list[dict[str, Any]]]:
    """(the output, the source's records, the index rows already committed there): the
    start of a run or of a resumed one, whichever engine computes. `records`: the source
    listed already (the command lists it before loading a model, so a bad source fails
    at once)."""
    records = load_records(options.source) if records is None else records
    out = open_store(location)
    committed = prepare_folder(out, options, model)
    if [r["key"] for r in committed] != [r.key for r in records[:len(committed)]]:
        raise UsageError(f"{location} was made from other inputs (its keys differ from "
                         f"{options.source}'s)")
    return out, records, committed


def pending_shards(records: list[Record], done: int, shard_size: int
                   ) -> Iterator[tuple[int, list[Record]]]:
    """(shard number, its records) after the `done` committed items (whole shards)."""
    if done % shard_size and done != len(records):
        raise UsageError(f"the index holds {done} items, not whole shards of {shard_size}: "
                         "was --shard-size changed?")
    for start in range(done, len(records), shard_size):
        yield start // shard_size, records[start:start + shard_size]


def extract_dataset(location: str | Path, options: Options, compute: Compute,
                    model: dict[str, str],
                    progress: bool = True, limits: ReadLimits = ReadLimits(),
                    records: list[Record] | None = None) -> dict[str, int]:
    """Run (or resume) an extraction; returns counts of done, failed and skipped items.
    `limits` bound the reading of each item; they are not in the manifest (they decide
    which items fail, not what the features are), so a resumed run may change them."""
    out, records, committed = open_output(location, options, model, records)
    bar = tqdm(total=len(records), initial=len(committed), unit="img", desc="extract",
               disable=not progress, smoothing=0.1)
    failed = sum("error" in row for row in committed)
    for number, shard in pending_shards(records, len(committed), options.shard_size):
        outcomes = shard_outcomes(shard, options, compute, limits)
        commit_shard(out, number, outcomes, options, model)
        failed += sum(o.error is not None for o in outcomes)
        bar.update(len(shard))
        bar.set_postfix(failed=failed)
    bar.close()
    return {"items": len(records), "resumed_after": len(committed), "failed": failed}
