"""The service facing strangers, through a real ``bentoml serve``: malformed forms, URLs where bytes belong, raw
bodies, stalled and vanishing clients, an API key, and a seeded fuzz of hostile requests. No 5xx from client input."""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from devserver import running_service
from hostile import FRAME, hostile_request, png

from segserve.gateway import ERROR_LIMIT

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "SEGSERVE_THREADS": "2", "SEGSERVE_BODY_TIMEOUT": "4",
           "SEGSERVE_MAX_PIXELS": "40000000"}  # fmt: skip
    for name in ("SEGSERVE_MODEL", "SEGSERVE_API_KEY"):
        env.pop(name, None)
    log = home / "serve.log"
    with running_service(env, log) as (url, _):
        yield url, log


@pytest.fixture(scope="module")
def client(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=TIMEOUT) as session:
        yield session


def assert_clean_error(answer: httpx.Response, status: int | None = None) -> str:
    """An error in the service's JSON shape (4xx unless ``status`` says otherwise): one bounded line, no path."""
    assert answer.status_code == status if status is not None else 400 <= answer.status_code < 500, (
        answer.status_code,
        answer.text[:300],
    )
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert 0 < len(body["error"]) <= ERROR_LIMIT and "\n" not in body["error"]
    assert "Traceback" not in answer.text and "/tmp" not in answer.text and str(ROOT) not in answer.text
    assert "pydantic" not in answer.text
    return body["error"]


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "message"),
    [
        ("text image", {"files": {"image": (None, "hello")}}, 400, "file upload"),
        ("URL image", {"files": {"image": (None, "http://127.0.0.1:3000/metadata")}}, 400, "never fetched"),
        ("other file field", {"files": {"foo": ("frame.png", FRAME, "image/png")}}, 400, "unexpected file field 'foo'"),
        (
            "broken multipart",
            {"content": b"hello", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            400,
            "malformed form",
        ),
        (
            "alpha=abc",
            {"files": {"image": ("f.png", FRAME)}, "data": {"alpha": "abc"}, "path": "/overlay"},
            400,
            "alpha must be a number",
        ),
        (
            "format=bmp",
            {"files": {"image": ("f.png", FRAME)}, "data": {"format": "bmp"}, "path": "/overlay"},
            400,
            "png or jpeg",
        ),
        ("missing image", {"data": {"alpha": "0.5"}, "path": "/overlay"}, 400, "missing field 'image'"),
        (
            "long classes",
            {"files": {"image": ("f.png", FRAME)}, "data": {"classes": "x" * 10_000}, "path": "/heatmaps"},
            400,
            "",
        ),
        (
            "empty classes",
            {"files": {"image": ("f.png", FRAME)}, "data": {"classes": ",,,"}, "path": "/heatmaps"},
            400,
            "names no class",
        ),
        ("unknown field", {"files": {"image": ("f.png", FRAME)}, "data": {"colour": "red"}}, 400, "unknown field"),
        ("JSON body", {"json": {"image": "aGVsbG8="}}, 415, "multipart field 'image' or as the whole body"),
        ("GET", {"method": "GET"}, 405, "takes POST"),
        ("unknown path", {"method": "GET", "path": "/nothing"}, 404, "Not Found"),
    ],
)
def test_the_issues_table_gets_4xx_json(
    client: httpx.Client, name: str, request_kwargs: dict, status: int, message: str
) -> None:
    kwargs = dict(request_kwargs)
    method, path = kwargs.pop("method", "POST"), kwargs.pop("path", "/segment")
    answer = client.request(method, path, **kwargs)
    text = assert_clean_error(answer, status)
    assert message in text
    assert "x" * 100 not in answer.text  # no echo of huge parameters


@pytest.mark.parametrize(
    ("path", "content_type", "query", "media"),
    [
        ("/segment", "image/png", "", "image/png"),
        ("/segment", "application/octet-stream", "", "image/png"),
        ("/overlay", "image/png", "?alpha=0.4&format=jpeg", "image/jpeg"),
        ("/overlay", "application/octet-stream", "?format=JPG", "image/jpeg"),
        ("/overlay", "image/png", "?format=PNG", "image/png"),
        ("/heatmaps", "image/png", "?classes=road,sky&format=npz", "application/x-npz"),
        ("/analyze", "image/webp", "", "application/json"),
    ],
)
def test_raw_body_uploads_answer_as_the_form_does(client: httpx.Client, path, content_type, query, media) -> None:
    raw = client.post(path + query, content=FRAME, headers={"content-type": content_type})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith(media), raw.text[:300]
    fields = dict(item.split("=") for item in query.lstrip("?").split("&") if item)
    form = client.post(path, files={"image": ("f.png", FRAME, "image/png")}, data=fields)
    assert form.status_code == 200
    if path == "/analyze":
        assert raw.json()["classes"] == form.json()["classes"]
    elif path == "/heatmaps":
        assert sorted(np.load(io.BytesIO(raw.content)).files) == ["road", "sky"]
    else:
        assert raw.content == form.content


def test_the_server_never_fetches_what_a_client_names(client: httpx.Client) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except OSError:
                continue

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    try:
        url = f"http://127.0.0.1:{port}/frame.png"
        for endpoint in ("/segment", "/overlay", "/heatmaps", "/analyze"):
            assert_clean_error(client.post(endpoint, files={"image": (None, url)}), 400)
            assert_clean_error(client.post(endpoint, data={"image": url}), 400)
            assert_clean_error(client.post(endpoint, content=url.encode(), headers={"content-type": "image/png"}), 400)
            assert_clean_error(client.post(endpoint, json={"image": url}), 415)
            path = str(ROOT / "README.md")
            assert_clean_error(client.post(endpoint, files={"image": (None, path)}), 400)
        time.sleep(1.0)
    finally:
        stop.set()
        watcher.join()
        listener.close()
    assert connections == []


def _stall(url: str, path: str, disconnect: bool, hold: threading.Event) -> None:
    """Headers and a few body bytes, then nothing (or a hang-up)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        sock.sendall(head.encode() + FRAME[:500])
        if disconnect:
            return
        hold.wait(30)


def test_slow_and_vanishing_clients_cannot_lock_others_out(served) -> None:
    url, log = served
    hold = threading.Event()
    with ThreadPoolExecutor(200) as stallers:
        for index in range(200):
            stallers.submit(_stall, url, "/segment", index % 2 == 1, hold)
        time.sleep(0.5)  # they are all connected and stalled (or gone) now
        statuses = []
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=TIMEOUT) as normal:  # past the stallers' body timeout (4 s)
            while len(statuses) < 40 or time.monotonic() - started < 5.5:
                image = png(64, 96, seed=len(statuses))
                statuses.append(normal.post("/segment", files={"image": ("f.png", image)}).status_code)
                assert normal.get("/readyz").status_code == 200
        hold.set()
    assert statuses.count(200) >= 0.95 * len(statuses), statuses
    text = log.read_text()
    assert "408 POST /segment: request body not received within 4 s" in text
    assert "client left before its POST /segment request was complete" in text
    assert "Traceback" not in text


def test_over_capacity_is_503_with_retry_after(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "SEGSERVE_THREADS": "1",
           "SEGSERVE_MAX_CONCURRENCY": "1"}  # fmt: skip
    env.pop("SEGSERVE_API_KEY", None)
    big = png(900, 1200, seed=5)
    with running_service(env, tmp_path / "serve.log") as (url, _):

        def call(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
                return session.post("/segment", content=big, headers={"content-type": "image/png"})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "capacity" in assert_clean_error(busy, 503)


def test_api_key(tmp_path: Path) -> None:
    key = "s3cret-" + "k" * 20
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "SEGSERVE_THREADS": "2", "SEGSERVE_API_KEY": key}
    log = tmp_path / "serve.log"
    with running_service(env, log) as (url, _), httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        for path in ("/livez", "/readyz", "/metrics"):
            assert session.get(path).status_code == 200, path
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key}, {"authorization": "Basic x"}):
            answer = session.post("/segment", content=FRAME, headers={"content-type": "image/png", **headers})
            assert answer.headers["www-authenticate"] == "Bearer"
            assert "API key" in assert_clean_error(answer, 401)
            assert session.get("/metadata", headers=headers).status_code == 401
        good = {"authorization": f"Bearer {key}"}
        assert session.post("/segment", content=FRAME, headers={"content-type": "image/png", **good}).status_code == 200
        assert session.get("/metadata", headers=good).status_code == 200
    assert key not in log.read_text()


# ---- fuzz -----------------------------------------------------------------------------------------------------------


def test_fuzz_500_hostile_requests(client: httpx.Client) -> None:
    before = client.post("/segment", content=FRAME, headers={"content-type": "image/png"})
    assert before.status_code == 200
    rng = random.Random(20261124)
    seen: dict[int, int] = {}
    for number in range(520):
        spec = hostile_request(rng)
        try:
            answer = client.request(**spec)
        except (httpx.RemoteProtocolError, httpx.LocalProtocolError):  # e.g. a Content-Length h11 refuses to send
            continue
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (number, spec["method"], spec["url"][:100], answer.text[:300])
        if answer.status_code >= 400:
            assert_clean_error(answer)
        assert not re.search(r"Traceback|site-packages|/tmp/", answer.text[:100_000])
    assert sum(seen.values()) >= 500 and sum(n for s, n in seen.items() if s >= 400) >= 250, seen
    after = client.post("/segment", content=FRAME, headers={"content-type": "image/png"})
    assert after.status_code == 200 and after.content == before.content
    assert json.loads(client.get("/metadata").text)["classes"]


def test_docs_and_the_spec_describe_both_upload_forms(client: httpx.Client) -> None:
    docs = client.get("/docs", follow_redirects=False)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "googletagmanager" not in docs.text
    assert "default-src 'self'" in docs.headers["content-security-policy"]
    spec = client.get("/docs.json").json()
    assert "get" in spec["paths"]["/metadata"]
    for path in ("/segment", "/overlay", "/heatmaps", "/analyze", "/regions"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(content), path
    assert {p["name"] for p in spec["paths"]["/overlay"]["post"]["parameters"]} == {"alpha", "format", "model"}
