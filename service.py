"""segserve's HTTP service (BentoML): any image in, label maps, overlays, heatmaps and summaries out.

Start it with ``bentoml serve`` in this folder (the README's main-job command). Images arrive as a multipart form
field ``image`` (raw bytes, whatever content type the client declares: the bytes decide) with the other parameters
as form fields, or as the whole request body with the parameters in the query string. Every request first passes
:class:`segserve.gateway.Gateway` (API key, body limits, one canonical form, admission, JSON errors), so the
endpoints below only see well-formed input. Binary answers are returned as bytes with their content type; client
errors as JSON ``{"error": ...}`` with a 4xx status. The work itself lives in ``segserve.serving``; settings come
from the environment variables of ``segserve.settings.Settings`` (README: "Serving"), read once at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import bentoml
from bentoml.validators import ContentType
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from segserve.gateway import Gateway
from segserve.serving import Answer, ClientError, SegmentationHandlers
from segserve.settings import Settings

SETTINGS = Settings.from_env()
# One INFO line per client error (segserve.http); python-multipart's own warnings about broken forms would only
# repeat it.
logging.getLogger("segserve").setLevel(logging.INFO)
logging.getLogger("python_multipart").setLevel(logging.ERROR)


# Per-model metrics on /metrics beside BentoML's own (bentoml.metrics: multiprocess-safe prometheus_client).
METRICS = {
    "requests": bentoml.metrics.Counter(
        name="segserve_model_requests", documentation="image requests by model, version, endpoint and outcome",
        labelnames=["model", "version", "endpoint", "outcome"],
    ),
    "latency": bentoml.metrics.Histogram(
        name="segserve_model_request_seconds", documentation="image request time (decode to answer) by model",
        labelnames=["model", "version", "endpoint"],
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf")),
    ),
    "inference": bentoml.metrics.Histogram(
        name="segserve_model_inference_seconds", documentation="model call time by model and version",
        labelnames=["model", "version"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")),
    ),
}  # fmt: skip


def answer(work: Callable[[], Answer | dict]) -> Response:
    """The handler's answer as a response; a ClientError as JSON ``{"error": ...}`` with its status."""
    try:
        result = work()
    except ClientError as error:
        return JSONResponse({"error": str(error)}, status_code=int(error.status))
    if isinstance(result, dict):
        return JSONResponse(result)
    payload, media_type = result
    return Response(payload, media_type=media_type)


async def metadata(request: Request) -> Response:
    """GET /metadata[?model=NAME@VERSION]: the model card, the engine in use and the segserve version."""
    handlers = bentoml.get_current_service().handlers
    return answer(lambda: handlers.metadata(request.query_params.get("model")))


async def models(request: Request) -> Response:
    """GET /models: every model and version with its card's essentials, in memory or not."""
    return answer(bentoml.get_current_service().handlers.listing)


extra_routes = Starlette(
    routes=[Route("/metadata", metadata, methods=["GET"]), Route("/models", models, methods=["GET"])]
)
ModelField = Annotated[str, Field(description="NAME or NAME@VERSION of a served model (default: the default model)")]

ImageField = Annotated[Path, Field(description="the image: PNG, JPEG, WebP, GIF, TIFF, BMP... (raw bytes)")]


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(
    name="segserve",
    workers=1,  # one process holds the model; requests are threads inside it (see segserve.serving)
    traffic={"timeout": SETTINGS.timeout},  # admission (max_concurrency) is the gateway's, after the upload
)
class Segmentation:
    """Semantic segmentation with an exported segserve model through onnxruntime (GPU when present)."""

    def __init__(self) -> None:
        # /readyz turns ready once this has loaded the default model
        self.handlers = SegmentationHandlers(SETTINGS, metrics=METRICS)

    @bentoml.api
    def segment(self, image: ImageField, model: ModelField = "") -> Annotated[Path, ContentType("image/png")]:
        """Palette PNG label map, same width and height as the image: pixel value = class index."""
        return answer(lambda: self.handlers.segment(_read(image), model))

    @bentoml.api
    def overlay(
        self,
        image: ImageField,
        alpha: Annotated[float, Field(description="weight of the class colours, 0 to 1")] = 0.5,
        format: Annotated[Literal["png", "jpeg"], Field(description="png or jpeg")] = "png",
        model: ModelField = "",
    ) -> Annotated[Path, ContentType("image/*")]:
        """The image blended with its class colours."""
        return answer(lambda: self.handlers.overlay(_read(image), alpha, format, model))

    @bentoml.api
    def heatmaps(
        self,
        image: ImageField,
        classes: Annotated[str, Field(description="comma list of class names (default: all)")] = "",
        format: Annotated[Literal["npz", "png"], Field(description="npz (float16) or png (8-bit, zipped)")] = "npz",
        model: ModelField = "",
    ) -> Annotated[Path, ContentType("application/octet-stream")]:
        """Per-class probability maps at the image's size: one float16 .npz, or a zip of 8-bit PNGs."""
        return answer(lambda: self.handlers.heatmaps(_read(image), classes, format, model))

    @bentoml.api
    def analyze(
        self,
        image: ImageField,
        regions: Annotated[bool, Field(description="also each class's regions: count and bounding boxes")] = False,
        model: ModelField = "",
    ) -> dict:
        """JSON: size, classes present with pixel share and mean confidence, timings, the model and engine."""
        return answer(lambda: self.handlers.analyze(_read(image), regions, model))

    @bentoml.api
    def regions(
        self,
        image: ImageField,
        format: Annotated[
            Literal["rle", "polygons", "geojson"],
            Field(description="rle (COCO, per class), polygons (per region) or geojson (FeatureCollection)"),
        ] = "geojson",
        tolerance: Annotated[float, Field(description="polygon simplification, pixels (0: exact pixel edges)")] = 1.0,
        min_area: Annotated[int, Field(description="drop regions under this many pixels")] = 0,
        model: ModelField = "",
    ) -> Annotated[Path, ContentType("application/json")]:
        """The label map as vectors. A georeferenced GeoTIFF gives GeoJSON in its map coordinates and CRS."""
        return answer(lambda: self.handlers.regions(_read(image), format, tolerance, min_area, model))


def _read(image: Path) -> bytes:
    """The upload's bytes (decoding from bytes keeps the server's temporary path out of error messages)."""
    return image.read_bytes()


Segmentation.add_asgi_middleware(Gateway, settings=SETTINGS)
