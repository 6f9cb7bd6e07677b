"""The raw request payload: multipart form or JSON body -> (fields, file bytes).

JSON bodies can be tens of MB of base64: they are parsed and decoded in a worker thread,
never on the event loop. Anything malformed (broken JSON, 100 000-deep nesting, integers
of thousands of digits, bad base64) is a 400 or 422 problem, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from cleandift.contract import shown

from .problems import Problem

MAX_FORM_FIELDS = 32
Fields = dict[str, Any]
Blobs = dict[str, list[bytes]]


def loads(text: str | bytes, what: str, status: int = 400) -> Any:
    """json.loads whose every failure is a client error naming `what`."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise Problem(status, f"{what} is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, int digits limit
        raise Problem(status, f"{what} is not valid JSON: {_short(exc)}") from exc


async def read_payload(request: Request, files: tuple[str, ...],
                       max_files: int | None = None) -> tuple[Fields, Blobs]:
    """(fields, file bytes by field name, in order) from a multipart form or a JSON body
    whose file fields are base64 strings (a list of them for a repeated field)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _form(request, files, max_files or len(files))
    if content_type == "application/json":
        body = await request.body()
        return await run_in_threadpool(_json_payload, body, files)
    raise Problem(415, "send multipart/form-data or application/json",
                  kind="unsupported-media-type")


async def _form(request: Request, files: tuple[str, ...], max_files: int
                ) -> tuple[Fields, Blobs]:
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
    except HTTPException as exc:  # starlette's multipart limits: its 400s
        detail = str(exc.detail)
        if detail.startswith(("Too many files", "Too many fields")):
            # Parameters over a limit, as in a JSON body (extra fields, 17 targets): 422.
            raise Problem(422, f"{detail.split('.')[0].lower()}: at most {max_files} files "
                          f"and {MAX_FORM_FIELDS} fields") from exc
        raise
    fields: Fields = {}
    blobs: Blobs = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in files:
                raise Problem(422, f"unexpected file field {shown(name)}")
            blobs.setdefault(name, []).append(await value.read())
        else:
            fields[name] = value
    return fields, blobs


def _json_payload(body: bytes, files: tuple[str, ...]) -> tuple[Fields, Blobs]:
    data = loads(body, "the body")
    if not isinstance(data, dict):
        raise Problem(422, "the JSON body must be an object")
    blobs: Blobs = {}
    for name in files:
        if name in data:
            value = data.pop(name)
            values = value if isinstance(value, list) else [value]
            blobs[name] = [_b64(name, v) for v in values]
    return data, blobs


def _b64(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise Problem(422, f"{name} must be a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Problem(400, f"{name} is not valid base64: {_short(exc)}") from exc


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "…"
