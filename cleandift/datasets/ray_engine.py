"""`extract-dataset --engine ray`: the same extraction on Ray Data, one machine or a cluster.

The driver keeps what makes the output a dataset: the records in input order, the shards
still to make, and the commit of each shard (file, then index lines) in order, as the
local engine does (`bulk.py`). Ray Data does the work between: a task reads each shard's
items within the limits (failures become error rows), cuts the readable ones into the
local engine's batches (so the forward passes, and thus the bytes, are the same), and a
pool of actors, each holding the model once (one GPU each where asked), decodes and
computes them. Execution streams with order preserved, so the driver holds about one
shard of results and commits as each shard completes; a killed run, run again with the
same arguments, skips the committed shards (byte-identical files).

Rows travel as one opaque bytes column (pickled parts): ragged images and maps need no
Arrow schema, and Ray moves them through its object store either way.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources import ReadLimits, Record, read_image_bytes

if TYPE_CHECKING:  # torch comes with them: the read tasks import this module without it
    from .bulk import Options, Outcome
    from .storage import Store


@dataclass(frozen=True)
class RayPlan:
    """What the actors load and where they run: `address` None starts Ray here."""

    extractor_args: dict[str, Any]  # load_extractor's arguments, as Settings gives them
    model: dict[str, str]  # the name and version the driver records: each actor checks
    workers: int = 1
    gpus_per_worker: float = 0.0
    address: str | None = None
    torch_threads: int | None = None


def read_shard(row: dict[str, Any], batch_size: int, limits: ReadLimits
               ) -> list[dict[str, bytes]]:
    """One shard's items read, as the local engine's batches (one part each; a shard
    with nothing readable is one part with its errors only). Torch-free, like everything
    it is handed: each read task's process would import torch otherwise (two seconds of
    CPU per process, taken from the actors on a small machine)."""
    number, records = row["shard"], [Record(**r) for r in pickle.loads(row["records"])]
    errors: dict[int, str] = {}
    readable: list[tuple[int, bytes]] = []
    for i, record in enumerate(records):
        try:
            readable.append((i, read_image_bytes(record, limits)))
        except OSError as exc:
            errors[i] = str(exc) or type(exc).__name__
    chunks = [readable[s:s + batch_size]
              for s in range(0, len(readable), batch_size)] or [[]]
    return [{"payload": pickle.dumps({
        "shard": number, "part": p, "parts": len(chunks), "keys": [r.key for r in records],
        "errors": errors if p == 0 else {}, "indices": [i for i, _ in chunk],
        "images": [data for _, data in chunk]})} for p, chunk in enumerate(chunks)]


class FeatureActor:
    """One model per actor, loaded once; each part's images decoded and computed as the
    local engine computes a batch. The driver described the model from its files; an actor
    that loads another (a registry's LATEST moved, other files on another node) stops the
    run rather than write features under the wrong name."""

    def __init__(self, plan: RayPlan, options: Options) -> None:
        import torch

        from ..loading import ModelLoadError, load_extractor
        from .compute import local_compute

        if plan.torch_threads:
            torch.set_num_threads(plan.torch_threads)
        extractor = load_extractor(**plan.extractor_args)
        loaded = {"model": extractor.info.name, "model_version": extractor.info.version}
        if loaded != plan.model:
            raise ModelLoadError(f"an actor loaded {loaded}, not the {plan.model} this "
                                 "dataset records: the model changed while the run started")
        self.compute = local_compute(extractor, options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        out = []
        for payload in batch["payload"]:
            part = pickle.loads(payload)
            results = self.compute(part.pop("images")) if part["indices"] else []
            part["results"] = [r if isinstance(r, str) else
                               ({k: v.numpy() for k, v in r[0].items()}, r[1])
                               for r in results]
            out.append(pickle.dumps(part))
        return {"payload": out}


def _outcomes(parts: list[dict[str, Any]]) -> list[Outcome]:
    """A whole shard's outcomes from its parts (any order)."""
    import numpy as np
    import torch

    from .bulk import Outcome

    outcomes = [Outcome(key) for key in parts[0]["keys"]]
    for part in parts:
        for i, message in part["errors"].items():
            outcomes[i].error = message
        for i, result in zip(part["indices"], part["results"]):
            if isinstance(result, str):
                outcomes[i].error = result
            else:
                maps, size = result
                outcomes[i].features = {k: torch.from_numpy(np.asarray(v))
                                        for k, v in maps.items()}
                outcomes[i].image_size = tuple(size)
    return outcomes


def model_error(exc: BaseException) -> str | None:
    """The ModelLoadError an actor raised while loading, as its message, or None. Ray
    hands the driver an ActorDiedError (or Ray Data's wrapper of it) that keeps only the
    text of the actor's exception, so the text is where it is found."""
    from ..loading import ModelLoadError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ModelLoadError):
            return str(seen)
        text = str(seen)
        if f"{ModelLoadError.__name__}: " in text:
            return text.rsplit(f"{ModelLoadError.__name__}: ", 1)[1].splitlines()[0]
        seen = seen.__cause__ or seen.__context__
    return None


def start_ray(address: str | None, progress: bool = True) -> None:
    """Join the cluster at `address`, or start Ray on this machine (None); once."""
    import ray

    # Ray Data logs a failed run's stack in full before raising it; the command says what
    # went wrong once (an actor's load error in one line, anything else as raised).
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=progress,
                 logging_level=logging.WARNING)


def ray_extract(location: str | Path, options: Options, plan: RayPlan, model: dict[str, str],
                progress: bool = True, limits: ReadLimits = ReadLimits(),
                records: list[Record] | None = None) -> dict[str, int]:
    """Run (or resume) an extraction on Ray; returns counts as `bulk.extract_dataset`."""
    import ray
    import ray.data

    from .bulk import open_output, pending_shards

    out, records, committed = open_output(location, options, model, records)
    shards = list(pending_shards(records, len(committed), options.shard_size))
    failed = sum("error" in row for row in committed)
    if shards:
        start_ray(plan.address, progress)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = progress
        failed += _run(out, options, plan, model, shards, limits)
    return {"items": len(records), "resumed_after": len(committed), "failed": failed}


def _run(out: Store, options: Options, plan: RayPlan, model: dict[str, str],
         shards: list[tuple[int, list[Record]]], limits: ReadLimits) -> int:
    import ray.data

    from .bulk import commit_shard

    items = [{"shard": n, "records": pickle.dumps([asdict(r) for r in rs])} for n, rs in shards]
    # One read task per actor and one ahead: reads (object storage, on a cluster) keep up
    # with every actor, and a small machine starts few processes (each imports Ray Data).
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .flat_map(partial(read_shard, batch_size=options.batch_size, limits=limits),
                         num_cpus=0, compute=ray.data.TaskPoolStrategy(size=plan.workers + 1))
               .map_batches(FeatureActor, fn_constructor_kwargs={"plan": plan,
                                                                 "options": options},
                            batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=plan.workers),
                            num_gpus=plan.gpus_per_worker or None,
                            num_cpus=None if plan.gpus_per_worker else 1))
    expected = iter(n for n, _ in shards)
    parts: list[dict[str, Any]] = []
    failed = 0
    # Each block as soon as it is computed: iter_rows' prefetch holds a block back until
    # the next one is ready (a shard committed one shard late, and a busier driver).
    for block in dataset.iter_batches(batch_size=None, prefetch_batches=0):
        for payload in block["payload"]:
            part = pickle.loads(payload)
            parts.append(part)
            if len(parts) < part["parts"]:
                continue
            number = next(expected)
            if part["shard"] != number:
                raise RuntimeError(f"shard {part['shard']} arrived before shard {number}")
            outcomes = _outcomes(parts)
            commit_shard(out, number, outcomes, options, model)
            failed += sum(o.error is not None for o in outcomes)
            parts = []
    return failed
