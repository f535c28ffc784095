"""The HTTP boundary: an ASGI middleware that receives, checks and normalises every request before BentoML sees it.

Every request is assumed hostile. In order:

1. **API key.** With ``SEGSERVE_API_KEY`` set, every path but the open ones (``/livez``, ``/readyz``, ``/metrics``)
   needs ``Authorization: Bearer <key>``, compared in constant time; anything else is 401 before any work.
2. **Image endpoints** (``/segment``, ``/overlay``, ``/heatmaps``, ``/analyze``, ``/regions``; each also takes
   ``model``): POST only (405). The body is
   received here, within ``body_timeout`` seconds (408) and ``max_body_bytes`` (413), at most ``max_uploads`` at a
   time (503). A client still uploading holds no processing slot, so slow or vanished clients cannot lock others
   out; one that disconnects mid-upload is logged in one line and forgotten.
3. **One form.** The image comes as a multipart file field ``image`` or as the whole body (any ``image/*`` type or
   ``application/octet-stream``, parameters in the query string). A text value where the image belongs is refused:
   the server never fetches a URL or opens a path that a client names. Parameters are checked and spelled
   canonically (``JPG`` -> ``jpeg``), then the request goes on as one canonical multipart form, so BentoML's own
   parsing only ever sees well-formed input.
4. **Admission.** At most ``max_concurrency`` requests are processed at once; more get 503 with ``Retry-After``.
5. **Errors.** Every 4xx/5xx leaves as JSON ``{"error": "..."}``, one line, at most :data:`ERROR_LIMIT`
   characters, no traceback, pydantic URL or server path; a client error is logged as one INFO line.

Also: ``GET /`` is segserve's page and ``GET /docs`` the API page (:data:`PAGES`, from ``segserve/web``, under a
Content-Security-Policy that allows nothing but this service), and the OpenAPI spec (``/docs.json``) gains
``/metadata`` and the raw-body form of each image endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.requests import Request

import segserve
from segserve.runtime.outputs import OutputError, output_format
from segserve.settings import Settings

log = logging.getLogger("segserve.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

ERROR_LIMIT = 300
#: Image endpoint -> its parameters besides ``image``.
ENDPOINTS: dict[str, tuple[str, ...]] = {
    "/segment": ("model",),
    "/overlay": ("alpha", "format", "model"),
    "/heatmaps": ("classes", "format", "model"),
    "/analyze": ("regions", "model"),
    "/regions": ("format", "tolerance", "min_area", "model"),
}
#: Path -> (file of segserve/web, content type): the page at / and the API page at /docs (segserve/web).
PAGES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/docs": ("docs.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/docs.js": ("docs.js", "text/javascript; charset=utf-8"),
}
#: Nothing but this service: no CDN, fonts, trackers or validator badges, whatever a page or a library tries.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
RAW_TYPES = ("image/", "application/octet-stream")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_PARAMETER_LIMIT = 4096  # characters of one parameter value (a class list of thousands of names still fits)


class Refusal(Exception):
    """A request answered with ``status`` and a one-line ``message`` before it reaches the service."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


def error_body(message: str) -> bytes:
    """``{"error": message}``: one line, bounded."""
    line = " ".join(str(message).split())
    if len(line) > ERROR_LIMIT:
        line = line[: ERROR_LIMIT - 3] + "..."
    return json.dumps({"error": line}).encode()


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = error_body(message)
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Upload:
    """A request reduced to what an image endpoint takes: the image's bytes and checked parameters."""

    image: bytes
    parameters: dict[str, str]

    def multipart(self) -> tuple[bytes, str]:
        """(body, content type) of the canonical form BentoML parses."""
        boundary = "segserve-" + secrets.token_hex(12)
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in self.parameters.items()
        ]
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="upload"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = b"".join([*parts, head, self.image, f"\r\n--{boundary}--\r\n".encode()])
        return body, f"multipart/form-data; boundary={boundary}"


class Gateway:
    """The ASGI middleware (outermost of segserve's; see the module docs)."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self._open = settings.open_path_set
        self._uploads = 0
        self._processing = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        try:
            self._authorise(scope)
            if path in PAGES and method in ("GET", "HEAD"):
                await _page(send, path, head=method == "HEAD")
                return
            if path in ENDPOINTS:
                await self._image_request(scope, receive, send)
                return
        except Refusal as refusal:
            _log_refusal(scope, refusal)
            await send_error(send, refusal.status, refusal.message, refusal.headers)
            return
        except ClientGone:
            log.info("client left before its %s %s request was complete", method, path)
            return
        await self.app(scope, receive, _errors_as_json(send, scope, patch_spec=path == "/docs.json"))

    def _authorise(self, scope: Scope) -> None:
        if self._key is None or scope["path"] in self._open:
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            raise Refusal(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer <key>",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def _image_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            raise Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{scope['path']} takes POST", {"Allow": "POST"})
        if self._uploads >= self.settings.max_uploads:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many uploads in progress; retry shortly",
                          {"Retry-After": "1"})  # fmt: skip
        self._uploads += 1
        try:
            body = await self._receive_body(scope, receive)
        finally:
            self._uploads -= 1
        upload = await parse_upload(scope, body)
        if self._processing >= self.settings.max_concurrency:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "the server is at capacity; retry shortly",
                          {"Retry-After": "1"})  # fmt: skip
        self._processing += 1
        try:
            await self._forward(scope, upload, send)
        finally:
            self._processing -= 1

    async def _receive_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body within the time and size limits."""
        limit, deadline = self.settings.max_body_bytes, asyncio.get_running_loop().time() + self.settings.body_timeout
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            raise Refusal(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
        if declared is not None and int(declared) > limit:
            raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over the limit of {limit:,} bytes")
        chunks, size = [], 0
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                late = f"request body not received within {self.settings.body_timeout:g} s"
                raise Refusal(HTTPStatus.REQUEST_TIMEOUT, late) from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over the limit of {limit:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope: Scope, upload: Upload, send: Send) -> None:
        body, content_type = upload.multipart()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        inner = {**scope, "headers": headers, "query_string": b""}
        await self.app(inner, _replay(body, then_wait=True), _errors_as_json(send, scope))


def _replay(body: bytes, then_wait: bool) -> Receive:
    """An ASGI ``receive`` that delivers an already received body once; afterwards it reports a disconnect, at
    once (a parser reading to the end) or never (the app: the client is still there for its answer)."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


async def parse_upload(scope: Scope, body: bytes) -> Upload:
    """The image and parameters of an image request, whichever form it came in; a Refusal says what is wrong."""
    endpoint = scope["path"]
    allowed = ENDPOINTS[endpoint]
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").strip()
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if content_type.lower().startswith(FORM_TYPES):
        image, fields = await _form(scope, body)
        if query:
            fields = [*query, *fields]
    elif content_type.lower().startswith(RAW_TYPES) or not content_type:
        image, fields = body, query
    else:
        raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                      f"content type {content_type[:60]!r}: send the image as a multipart field 'image' or as the "
                      "whole body (image/* or application/octet-stream)")  # fmt: skip
    parameters: dict[str, str] = {}
    for name, value in fields:
        if name not in allowed:
            takes = ", ".join(("image", *allowed))
            raise Refusal(HTTPStatus.BAD_REQUEST, f"unknown field {name[:40]!r}: {endpoint} takes {takes}")
        if name in parameters:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"field {name!r} given twice")
        parameters[name] = _parameter(endpoint, name, value)
    return Upload(image, parameters)


async def _form(scope: Scope, body: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """(image bytes, text fields) of a form; the image must be a file part (so a URL-encoded form has none)."""
    request = Request({**scope, "type": "http"}, _replay(body, then_wait=False))
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=_PARAMETER_LIMIT)
    except Exception as error:  # python-multipart / starlette raise several types for a broken body
        detail = getattr(error, "detail", None) or str(error) or type(error).__name__
        raise Refusal(HTTPStatus.BAD_REQUEST, f"malformed form: {detail}") from None
    image: bytes | None = None
    fields: list[tuple[str, str]] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "image":
                    raise Refusal(
                        HTTPStatus.BAD_REQUEST, f"unexpected file field {name[:40]!r}: send the image as 'image'"
                    )
                image = await value.read()
            elif name == "image":
                raise Refusal(HTTPStatus.BAD_REQUEST,
                              "field 'image' must be the image's bytes as a file upload (curl -F image=@photo.jpg), "
                              "not text: URLs and paths are never fetched")  # fmt: skip
            else:
                fields.append((name, value))
    finally:
        await form.close()
    if image is None:
        raise Refusal(HTTPStatus.BAD_REQUEST, "missing field 'image' (the image file)")
    return image, fields


def _parameter(endpoint: str, name: str, value: str) -> str:
    """A parameter's value, checked and spelled as the service expects it."""
    if len(value) > _PARAMETER_LIMIT:
        raise Refusal(HTTPStatus.BAD_REQUEST, f"{name} is too long ({len(value):,} characters)")
    text = value.strip()
    if name == "alpha":
        try:
            number = float(text)
        except ValueError:
            raise Refusal(
                HTTPStatus.BAD_REQUEST, f"alpha must be a number between 0 and 1, got {text[:40]!r}"
            ) from None
        if not math.isfinite(number) or not 0 <= number <= 1:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"alpha must be between 0 and 1, got {text[:40]}")
        return repr(number)
    if name == "format":
        try:
            return output_format(endpoint.strip("/"), text)
        except OutputError as error:
            raise Refusal(HTTPStatus.BAD_REQUEST, str(error)) from None
    if name == "tolerance":
        return repr(_number(name, text, lowest=0.0))
    if name == "min_area":
        if not text.isdigit():
            raise Refusal(HTTPStatus.BAD_REQUEST, f"min_area must be a whole number of pixels >= 0, got {text[:40]!r}")
        return text
    if name == "regions":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise Refusal(HTTPStatus.BAD_REQUEST, f"regions must be true or false, got {text[:40]!r}")
        return "true" if text.lower() in ("true", "1", "yes") else "false"
    if name == "model" and (len(text) > 120 or re.search(r"[\x00-\x1f]", text)):
        raise Refusal(HTTPStatus.NOT_FOUND, f"unknown model {text[:40]!r}: name a model as NAME or NAME@VERSION")
    if name == "classes" and re.search(r"[\x00-\x1f]", text):
        raise Refusal(HTTPStatus.BAD_REQUEST, "classes must be a comma list of class names")
    return text


def _number(name: str, text: str, lowest: float, highest: float | None = None) -> float:
    """A finite number in [lowest, highest], or a Refusal naming the parameter and its range."""
    span = f"between {lowest:g} and {highest:g}" if highest is not None else f">= {lowest:g}"
    try:
        number = float(text)
    except ValueError:
        raise Refusal(HTTPStatus.BAD_REQUEST, f"{name} must be a number {span}, got {text[:40]!r}") from None
    if not math.isfinite(number) or number < lowest or (highest is not None and number > highest):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"{name} must be {span}, got {text[:40]}")
    return number


def _log_refusal(scope: Scope, refusal: Refusal) -> None:
    log.info("%d %s %s: %s", int(refusal.status), scope["method"], scope["path"][:100], refusal.message)


async def _page(send: Send, path: str, head: bool) -> None:
    """One of :data:`PAGES`, from the package (each is read from a fixed name: no client path reaches a file)."""
    name, content_type = PAGES[path]
    body = (resources.files("segserve") / "web" / name).read_bytes()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            (b"content-security-policy", PAGE_POLICY.encode()), (b"cache-control", b"no-cache"),
                            (b"x-content-type-options", b"nosniff")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"" if head else body})


def _errors_as_json(send: Send, scope: Scope, patch_spec: bool = False) -> Send:
    """``send`` that rewrites any 4xx/5xx answer into the service's JSON shape (and patches the OpenAPI spec)."""
    held: dict[str, Any] = {}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400 and not patch_spec:
                await send(message)
                return
            held["start"], held["body"] = message, b""
            return
        if "start" not in held:
            await send(message)
            return
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        start = held.pop("start")
        status = start["status"]
        if status < 400:  # the OpenAPI spec
            body = patch_openapi(held["body"])
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        message_text = _error_text(held["body"], status)
        if status >= 500:
            log.error("%d %s %s: %s", status, scope["method"], scope["path"][:100], message_text)
        else:
            log.info("%d %s %s: %s", status, scope["method"], scope["path"][:100], message_text)
        extra = {k.decode(): v.decode() for k, v in start["headers"] if k in (b"retry-after", b"allow")}
        await send_error(send, status, message_text, extra)

    return wrapped


def _error_text(body: bytes, status: int) -> str:
    """The error message of a downstream answer, without details that may echo input or name internals."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        text = parsed["error"]
    elif isinstance(parsed, list) and parsed and isinstance(parsed[0], dict) and "error" in parsed[0]:
        text = str(parsed[0]["error"])  # BentoML answers some errors as a one-element list
    else:
        text = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    if "Traceback" in text or re.search(r"(/[\w.-]+){2,}", text):
        text = HTTPStatus(status).phrase
    return text


def patch_openapi(body: bytes) -> bytes:
    """BentoML's spec plus ``GET /metadata``, ``GET /models``, each image endpoint's raw-body form, and a description
    of segserve's own."""
    try:
        spec = json.loads(body)
    except ValueError:
        return body
    info = spec.setdefault("info", {})
    info["version"] = segserve.__version__
    info.pop("contact", None)
    # BentoML's default description carries badge images from five other hosts; the page loads nothing from outside
    info["description"] = ("segserve: semantic segmentation of any image. Send an image to an endpoint below, as a "
                           "multipart field `image` or as the whole body; the page for people is at `/`.")  # fmt: skip
    paths = spec.setdefault("paths", {})
    json_answer = {"content": {"application/json": {"schema": {"type": "object"}}}}
    model = [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
              "description": "NAME or NAME@VERSION (default: the default model)"}]  # fmt: skip
    paths["/metadata"] = {"get": {
        "summary": "The model card, the providers in use and the segserve version", "tags": ["Service APIs"],
        "parameters": model, "responses": {"200": {"description": "model metadata", **json_answer}},
    }}  # fmt: skip
    paths["/models"] = {"get": {
        "summary": "Every model and version served, with its card's essentials", "tags": ["Service APIs"],
        "responses": {"200": {"description": "the models", **json_answer}},
    }}  # fmt: skip
    raw = {"schema": {"type": "string", "format": "binary"}}
    for path, parameters in ENDPOINTS.items():
        operation = paths.get(path, {}).get("post")
        if operation is None:
            continue
        content = operation.setdefault("requestBody", {}).setdefault("content", {})
        content["image/*"] = raw
        content["application/octet-stream"] = raw
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
             "description": "with a raw-body upload: this parameter (a multipart form sends it as a field)"}
            for name in parameters
        ]  # fmt: skip
    return json.dumps(spec).encode()
