"""Image files made by the tests: good ones in every format and mode, and bad ones.

Shared by the core, service and reliability suites so each kind of input is defined once.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
from PIL import Image


def textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour field with structure at several scales (unique features)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    image = np.zeros((height, width, 3))
    for _ in range(12):
        fx, fy = rng.uniform(1, 12, size=2)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        image += np.sin(2 * np.pi * (fx * xs + fy * ys)[..., None] + phase)
    image = (image - image.min()) / (image.max() - image.min())
    return Image.fromarray((image * 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(
        b"IEND", b""
    )


def rotated_jpeg() -> tuple[bytes, tuple[int, int]]:
    """A 60x40 JPEG with EXIF orientation 6 (display rotated): shown as 40x60."""
    image = textured_image(60, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes()), (40, 60)


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(textured_image(50, 40, seed=6).convert("CMYK"), "JPEG")


def palette_with_transparency() -> bytes:
    image = textured_image(40, 30, seed=7).convert("P", palette=Image.Palette.ADAPTIVE)
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [textured_image(32, 32, seed=s).convert("P") for s in (8, 9, 10)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def good_images() -> dict[str, bytes]:
    base = textured_image(64, 48, seed=4)
    return {
        "jpeg": encode(base, "JPEG"),
        "png": encode(base, "PNG"),
        "webp": encode(base, "WEBP"),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "gif": animated_gif(),
        "gray": encode(base.convert("L"), "PNG"),
        "gray_alpha": encode(base.convert("LA"), "PNG"),
        "rgba": encode(base.convert("RGBA"), "PNG"),
        "palette_transparency": palette_with_transparency(),
        "cmyk": cmyk_jpeg(),
        "png16": sixteen_bit_png(),
        "one_pixel": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "exif_rotated": rotated_jpeg()[0],
    }


def bad_images() -> dict[str, bytes]:
    """name -> bytes that must be refused with a 400-class ImageError."""
    jpeg = encode(textured_image(64, 48, seed=4), "JPEG")
    png = encode(textured_image(64, 48, seed=4), "PNG")
    return {
        "empty": b"",
        "text": b"hello, this is not an image\n" * 4,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 2],
        "html": b"<html><body>nope</body></html>",
    }


class BadServer:
    """A local HTTP server (127.0.0.1, its own threads) with good and hostile URLs:
    `/good.jpg`; `/endless` (a body without end); `/trickle` (one byte per `interval`);
    `/slow-headers` (the status line, then one header byte per `interval`). Every loop is
    bounded and ends when the client leaves or the server stops."""

    def __init__(self, image: bytes, interval: float = 0.5, max_s: float = 30.0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stop = self.stop = threading.Event()
        steps = int(max_s / interval)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                with contextlib.suppress(OSError):  # the client gave up: the loop ends
                    self._answer()

            def _answer(self) -> None:
                if self.path == "/slow-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(steps):
                        if stop.wait(interval):
                            return
                        self.wfile.write(b"X")
                        self.wfile.flush()
                    return
                if self.path not in ("/good.jpg", "/endless", "/trickle"):
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path == "/good.jpg":
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                elif self.path == "/endless":  # no length: the body ends when we stop
                    self.send_header("Connection", "close")
                    self.end_headers()
                    block = b"\xff" * (1 << 16)
                    for _ in range(1 << 15):  # 2 GiB at most
                        if stop.is_set():
                            return
                        self.wfile.write(block)
                elif self.path == "/trickle":
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(steps):
                        if stop.wait(interval):
                            return
                        self.wfile.write(b"\xff")
                        self.wfile.flush()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BadServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def bad_sources(folder, url: str) -> dict[str, str]:
    """name -> a list-file entry that one `extract-dataset` item must survive as an error
    row: hostile URLs of a BadServer at `url`, special and huge files made in `folder`."""
    import os

    fifo, huge = folder / "fifo.jpg", folder / "huge.jpg"
    os.mkfifo(fifo)
    with open(huge, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GiB, sparse: no disk used
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return {
        "endless URL": f"{url}/endless",
        "trickling URL": f"{url}/trickle",
        "URL trickling its headers": f"{url}/slow-headers",
        "malformed URL": "http://[::1:bad/x.jpg",
        "URL nobody serves": f"{url}/missing.jpg",
        "/dev/zero": "/dev/zero",
        "a FIFO": str(fifo),
        "a 3 GiB file": str(huge),
        "a folder": str(folder),
        "a missing file": str(folder / "nowhere.jpg"),
        "a corrupt JPEG": str(folder / "corrupt.jpg"),
    }
