"""Every kind of bad input gets its API.md status; the service stays ready and a good
request afterwards returns the same features as before."""

from __future__ import annotations

import base64
import http.client
import json

import httpx
import pytest

from tests.corpus import (
    animated_gif,
    cmyk_jpeg,
    encode,
    palette_with_transparency,
    png_bomb,
    rotated_jpeg,
    sixteen_bit_png,
    textured_image,
)
from tests.service.service_helpers import running_service

pytestmark = pytest.mark.integration


JPEG = encode(textured_image(64, 48, 4), "JPEG")
PNG = encode(textured_image(64, 48, 4), "PNG")


def features(client, data: bytes, content_type="image/jpeg", **fields):
    return client.post("/features", files={"image": ("f", data, content_type)}, data=fields)


def correspond(client, points):
    return client.post("/correspond", files={"source": ("a", JPEG), "target": ("b", PNG)},
                       data={"points": points})


CASES = {
    # name: (send, expected status)
    "zero bytes": (lambda c: features(c, b""), 400),
    "text": (lambda c: features(c, b"plain text, not an image\n" * 10), 400),
    "truncated JPEG": (lambda c: features(c, JPEG[: len(JPEG) // 2]), 400),
    "truncated PNG": (lambda c: features(c, PNG[: len(PNG) // 3]), 400),
    "PNG bomb 60000x60000": (lambda c: features(c, png_bomb()), 413),
    "1x1 image": (lambda c: features(c, encode(textured_image(1, 1), "PNG")), 200),
    "16-bit PNG": (lambda c: features(c, sixteen_bit_png()), 200),
    "CMYK JPEG": (lambda c: features(c, cmyk_jpeg()), 200),
    "animated GIF": (lambda c: features(c, animated_gif()), 200),
    "EXIF-rotated JPEG": (lambda c: features(c, rotated_jpeg()[0]), 200),
    "palette with transparency": (lambda c: features(c, palette_with_transparency()), 200),
    "wrong content type": (lambda c: c.post("/features", content=JPEG,
                                            headers={"content-type": "image/jpeg"}), 415),
    "body over the limit": (lambda c: c.post("/features", content=b"0" * (33 << 20),
                                             headers={"content-type": "application/json"}), 413),
    "malformed JSON": (lambda c: c.post("/features", content=b'{"image": "abc',
                                        headers={"content-type": "application/json"}), 400),
    "malformed base64": (lambda c: c.post("/features", json={"image": "@@not base64@@"}), 400),
    "NaN point": (lambda c: correspond(c, "[[NaN, 3]]"), 422),
    "point outside the image": (lambda c: correspond(c, "[[10, 480]]"), 422),
    "too many points": (lambda c: correspond(c, json.dumps([[1, 1]] * 1001)), 422),
    "malformed points": (lambda c: correspond(c, "[[1, 2], [3]]"), 422),
    "unknown layer": (lambda c: features(c, JPEG, layers="us6,us11"), 422),
    "bad size": (lambda c: features(c, JPEG, size="100"), 422),
    "huge prompt": (lambda c: features(c, JPEG, prompt="x" * 100_000), 422),
    "17 targets (form)": (lambda c: c.post("/correspond", files=[("source", ("a", JPEG))] + [
        ("target", (f"t{i}", PNG)) for i in range(17)]), 422),
}
MAX_PROBLEM_BYTES = 1500  # a refusal names what it refuses, without echoing all of it


@pytest.fixture
def service_client(settings, extractor):
    with running_service(settings, extractor) as (client, _):
        yield client


def test_bad_inputs_get_their_status_and_change_nothing(service_client, record):
    client = service_client
    before = features(client, JPEG, layers="us6").json()["features"]["us6"]["data"]
    statuses = {}
    for name, (send, expected) in CASES.items():
        response = send(client)
        statuses[name] = response.status_code
        assert response.status_code == expected, (name, response.text[:300])
        if expected != 200:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["status"] == expected
            assert len(response.content) < MAX_PROBLEM_BYTES, (name, len(response.content))
        assert client.get("/readyz").status_code == 200, f"not ready after {name}"
    after = features(client, JPEG, layers="us6").json()["features"]["us6"]["data"]
    assert before == after
    rotated = features(client, rotated_jpeg()[0]).json()["image"]
    assert (rotated["width"], rotated["height"]) == rotated_jpeg()[1]
    record(fault=f"bad input corpus ({len(CASES)} kinds)", sent=len(CASES),
           succeeded=sum(s == 200 for s in statuses.values()),
           refused=sum(s != 200 for s in statuses.values()), errors=0, lost=0,
           notes="; ".join(f"{k}: {v}" for k, v in statuses.items()))


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "cleandift-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="f"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + v + b"\r\n"
              for k, v in files.items()]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


B64 = base64.b64encode(JPEG).decode()
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 400
MB = "x" * 1_000_000
MALFORMED = {
    # name: (path, json body or (form fields, files), expected status)
    "400-digit point (JSON)": ("/correspond", f'{{"source": "{B64}", "target": "{B64}", '
                               f'"points": [[{HUGE}, 2]]}}', 422),
    "400-digit point (form)": ("/correspond", ({"points": f"[[{HUGE}, 2]]"},
                                               {"source": JPEG, "target": JPEG}), 422),
    "100000-deep points (JSON)": ("/correspond", f'{{"source": "{B64}", "target": "{B64}", '
                                  f'"points": {DEEP}}}', 400),
    "100000-deep points (form)": ("/correspond", ({"points": DEEP},
                                                  {"source": JPEG, "target": JPEG}), 422),
    "100000-deep body": ("/features", DEEP, 400),
    "5000-digit size (JSON)": ("/features", f'{{"image": "{B64}", "size": {"7" * 5000}}}', 400),
    "4000-digit size (JSON)": ("/features", f'{{"image": "{B64}", "size": {"6" * 4000}}}', 422),
    "5000-digit size (form)": ("/features", ({"size": "7" * 5000}, {"image": JPEG}), 422),
    "size 0 (JSON)": ("/features", f'{{"image": "{B64}", "size": 0}}', 422),
    "size 0 (form)": ("/features", ({"size": "0"}, {"image": JPEG}), 422),
    "negative size": ("/features", f'{{"image": "{B64}", "size": -256}}', 422),
    "fractional size": ("/features", f'{{"image": "{B64}", "size": 256.5}}', 422),
    "1e400 point": ("/correspond", f'{{"source": "{B64}", "target": "{B64}", '
                    '"points": [[1e400, 2]]}', 422),
    "huge max_matches": ("/correspond", f'{{"source": "{B64}", "target": "{B64}", '
                         f'"max_matches": {"1" * 30}}}', 422),
    "layers not a list": ("/features", f'{{"image": "{B64}", "layers": 6}}', 422),
    "prompt not a string": ("/features", f'{{"image": "{B64}", "prompt": {{"a": 1}}}}', 422),
    "lone surrogate prompt": ("/features", f'{{"image": "{B64}", "prompt": "\\ud800"}}', 422),
    "top-level array": ("/features", "[1, 2]", 422),
    "null body": ("/features", "null", 422),
    "two files for one": ("/features", ({}, {"image": JPEG, "image2": JPEG}), 422),
    "grid true (JSON)": ("/features", f'{{"image": "{B64}", "grid": true}}', 422),
    "max_matches true (JSON)": ("/correspond", f'{{"source": "{B64}", "target": "{B64}", '
                                '"max_matches": true}', 422),
    "1 MB layer name (JSON)": ("/features", f'{{"image": "{B64}", "layers": ["{MB}"]}}', 422),
    "1 MB unexpected key (JSON)": ("/features", f'{{"image": "{B64}", "{MB}": 1}}', 422),
    "1 MB point (form)": ("/correspond", ({"points": f'[["{MB}", 1]]'},
                                          {"source": JPEG, "target": JPEG}), 422),
}


def test_malformed_numbers_get_4xx_and_keep_the_connection(service_client, record):
    """One keep-alive connection for everything: after each malformed request the next
    request on the same connection must be answered (a 500 used to close it)."""
    url = httpx.URL(str(service_client.base_url))
    connection = http.client.HTTPConnection(url.host, url.port, timeout=60)
    statuses = {}
    for name, (path, payload, expected) in MALFORMED.items():
        if isinstance(payload, str):
            body, content_type = payload.encode(), "application/json"
        else:
            body, content_type = _multipart(*payload)
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        text = response.read()
        statuses[name] = response.status
        assert response.status == expected, (name, text[:300])
        assert response.getheader("content-type").startswith("application/problem+json")
        assert len(text) < MAX_PROBLEM_BYTES, (name, len(text))
        connection.request("GET", "/readyz")  # the same socket: it must still be open
        ready = connection.getresponse()
        ready.read()
        assert ready.status == 200, f"not ready after {name}"
    connection.close()
    record(fault=f"malformed numbers and nesting ({len(MALFORMED)} kinds, one connection)",
           sent=len(MALFORMED), succeeded=0, refused=len(MALFORMED), errors=0, lost=0,
           notes="; ".join(f"{k}: {v}" for k, v in statuses.items()))
