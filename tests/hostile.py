"""Hostile HTTP requests for the tests and the benchmarks: a seeded generator of malformed ones, and a good frame."""

from __future__ import annotations

import io
import os
import random
from urllib.parse import urlencode

import httpx
import numpy as np
from PIL import Image


def png(height: int = 60, width: int = 80, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


FRAME = png(90, 120, seed=1)

ENDPOINTS = ("/segment", "/overlay", "/heatmaps", "/analyze", "/metadata", "/docs", "/readyz", "/nope", "/../etc")
NAMES = ("image", "alpha", "format", "classes", "foo", "", "imäge", "image\x00", "../../x", "a" * 300)
VALUES = ("0.5", "2", "-1", "nan", "inf", "jpeg", "JPG", "bmp", "road,sky", ",,,", "x" * 5000, "\u202e\ufeff",
          "http://127.0.0.1:1/x", "/etc/passwd", "", "é" * 50)  # fmt: skip
TYPES = ("image/png", "application/octet-stream", "text/plain", "application/json", "multipart/form-data",
         "multipart/form-data; boundary=", "multipart/form-data; boundary=abc", "image/*; charset=utf-8", "",
         "application/x-www-form-urlencoded", "\u00e9/\u00e9")  # fmt: skip


def hostile_request(rng: random.Random) -> dict:
    """One randomly malformed request, as keyword arguments of ``httpx.Client.request``."""
    path = rng.choice(ENDPOINTS)
    query = urlencode([(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(0, 3))])
    kind = rng.randrange(6)
    headers: dict[str, str] = {}
    body: bytes | None = None
    files = data = None
    if kind == 0:  # random multipart structure
        files = {}
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(NAMES)
            payload = rng.choice([FRAME, FRAME[: rng.randint(0, len(FRAME))], os.urandom(rng.randint(0, 2000)),
                                  rng.choice(VALUES).encode()])  # fmt: skip
            files[name] = (rng.choice(["f.png", "../../etc/passwd", "名前.png", None, "a" * 500]), payload)
        data = {rng.choice(NAMES): rng.choice(VALUES) for _ in range(rng.randint(0, 2))}
    elif kind == 1:  # a truncated valid form
        request = httpx.Request("POST", "http://x/", files={"image": ("f.png", FRAME)}, data={"alpha": "0.5"})
        full = request.read()
        body = full[: rng.randint(0, len(full))]
        headers["content-type"] = request.headers["content-type"]
    elif kind == 2:  # random bytes as the image
        body = os.urandom(rng.randint(0, 5000))
        headers["content-type"] = rng.choice(TYPES)
    elif kind == 3:  # a corrupted real image
        mangled = bytearray(FRAME)
        for _ in range(rng.randint(1, 50)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        body = bytes(mangled)
        headers["content-type"] = "image/png"
    elif kind == 4:  # huge parameters
        body = FRAME
        headers["content-type"] = "image/png"
        query = f"classes={'c,' * rng.randint(1000, 20000)}&format={'z' * rng.randint(1, 9000)}"
    else:  # odd headers
        body = rng.choice([b"", FRAME, b"{}"])
        headers["content-type"] = rng.choice(TYPES)
        headers["content-length"] = rng.choice([str(len(body)), "abc", "-5"]) if rng.random() < 0.3 else str(len(body))
    method = rng.choice(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"])
    encoded = {name: value.encode() for name, value in headers.items()}  # non-ASCII header values as raw bytes
    return {"method": method, "url": path + ("?" + query if query else ""), "headers": encoded, "content": body,
            "files": files, "data": data}  # fmt: skip
