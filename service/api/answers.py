"""From a job to its HTTP answer, in one place: the format negotiated, the conditional
request checked, the job submitted and its result obtained (inline, or fetched from the
worker that holds it), then answered: features in that format (bytes streamed by
formats.py), matches as JSON; model version and timings as headers on every format."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi.responses import JSONResponse, StreamingResponse

from cleandift.contract import SCALE_SUFFIX
from cleandift.dtypes import NPY_DESCR

from ..messages import Job, JobSpec, Result
from ..queue.partitions import Producer
from .fetch import FetchFailed, ResultFetcher
from .formats import FORMATS, Raw, encode, inline_raw
from .problems import Problem

log = logging.getLogger(__name__)
FETCH_ATTEMPTS = 3
QUANTIZATION = ("int8, symmetric per channel: value = KEY * KEY.scale, the channel axis "
                "being 0 for maps and grids, 1 for points")


def negotiate(format_param: str | None, accept: str | None) -> str:
    """`format=` wins; then the first Accept type we serve; JSON by default."""
    if format_param is not None:
        if format_param not in FORMATS:
            raise Problem(422, f"format must be one of {sorted(FORMATS)}")
        return format_param
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        for name, served in FORMATS.items():
            if media == served:
                return name
    return "json"


def check_format(fmt: str, spec: JobSpec) -> None:
    """Refused before anything is queued: npy holds one array of a numpy dtype."""
    if fmt == "npy" and (len(spec.layers) != 1 or spec.dtype not in NPY_DESCR):
        raise Problem(422, "npy holds exactly one float16 or float32 array; ask for one "
                      "layer, or use safetensors or json")


async def obtain(producer: Producer, fetcher: ResultFetcher, job: Job,
                 gone: Callable[[], Awaitable[bool]] | None = None) -> tuple[Result, Raw]:
    """Submit, wait, and open the result's bytes wherever they are: inline, or on the
    worker that holds them (if it cannot deliver, the job runs again elsewhere). `gone`:
    the client went away (the job is cancelled)."""
    start = time.perf_counter()
    for attempt in range(FETCH_ATTEMPTS):
        result = await producer.submit(job, again=attempt > 0, gone=gone)
        meta = result.meta
        if meta.status != 200:
            raise Problem(meta.status, meta.error)
        meta.timings_ms["total"] = round((time.perf_counter() - start) * 1000, 3)
        if not meta.location:
            return result, inline_raw([result.data[key] for key in meta.layers])
        try:
            return result, inline_raw([await fetcher.fetch(meta)])
        except FetchFailed as exc:
            log.warning("result of %s not delivered (%s): running the job again", job.spec.id,
                        exc)
    raise Problem(503, "the workers that ran the job could not deliver its result",
                  kind="not-ready", headers={"Retry-After": "1"})


def features_answer(result: Result, raw: Raw, fmt: str, spec: JobSpec) -> StreamingResponse:
    meta, image_size, input_size = result.meta, spec.image_sizes[0], spec.input_size
    metadata = {"model": meta.model, "model_version": meta.model_version,
                "image_width": str(image_size[0]), "image_height": str(image_size[1]),
                "input_size": str(input_size), "layout": meta.layout}
    if any(key.endswith(SCALE_SUFFIX) for key in meta.layers):
        metadata["quantization"] = QUANTIZATION
    head = {"model": meta.model, "model_version": meta.model_version,
            "image": {"width": image_size[0], "height": image_size[1]},
            "input_size": input_size, "layout": meta.layout, "timings_ms": meta.timings_ms}
    body = encode(fmt, meta, raw, metadata=metadata, head=head)
    headers = {**version_headers(result), "Content-Length": str(body.length),
               "ETag": answer_etag(spec, meta.model, meta.model_version, fmt)}
    return StreamingResponse(body.chunks, media_type=body.media_type, headers=headers)


def correspond_answer(result: Result) -> JSONResponse:
    """One target: `matches` (and `heatmap`); several: `results`, one per target, in order."""
    meta = result.meta
    body: dict[str, object] = {"model": meta.model, "model_version": meta.model_version}
    for matches in [meta.matches or []] + [t.matches for t in meta.targets or []]:
        for match in matches:  # a worker older than exact matching never proved its answer
            match.setdefault("exact", False)
    if meta.targets is not None:
        body["results"] = [t.model_dump(exclude_none=True) for t in meta.targets]
    else:
        body["matches"] = meta.matches or []
        if meta.heatmap is not None:
            body["heatmap"] = meta.heatmap.model_dump()
    body["timings_ms"] = meta.timings_ms
    return JSONResponse(body, headers=version_headers(result))


# The job's fields that change a features answer's bytes (docs/cache.md); every other
# field of JobSpec is named in tests/service/test_cache_keys.py as one that does not.
ETAG_FIELDS = ("kind", "input_size", "layers", "image_sizes", "prompt", "mode", "dtype",
               "points", "grid", "content")


def answer_etag(spec: JobSpec, model: str, model_version: str, fmt: str) -> str:
    """A weak ETag for a features answer: every input that changes its bytes (the pixels'
    hash, the original image size, the model and its version, every output parameter, the
    format). Weak: float rounding may differ between batch compositions or workers on
    other hardware, the meaning does not."""
    parts = [model, model_version, fmt, spec.model_dump_json(include=set(ETAG_FIELDS))]
    return f'W/"{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]}"'


def check_not_modified(request_headers: Mapping[str, str], etag: str) -> None:
    """If-None-Match naming this answer: the client's copy is current, nothing is queued.
    For a POST, RFC 9110 says 412 (304 is for GET and HEAD); the ETag comes with it."""
    wanted = request_headers.get("if-none-match")
    if wanted and (wanted.strip() == "*" or etag in (t.strip() for t in wanted.split(","))):
        raise Problem(412, "not modified: the answer would be the one you hold (same ETag)",
                      kind="not-modified", headers={"ETag": etag})


def version_headers(result: Result) -> dict[str, str]:
    """Binary formats have no body field for these, so every format gets them as headers."""
    headers = {"X-Model-Version": result.meta.model_version,
               "X-Cache": "hit" if result.meta.cached else "miss"}
    headers.update({f"X-Timing-{k.title()}-Ms": f"{v:.3f}"
                    for k, v in result.meta.timings_ms.items()})
    return headers
