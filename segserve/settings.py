"""Every environment variable segserve reads, its default and its check: one typed object (pydantic-settings).

The faces read it once (the service at start-up, ``Segmenter()`` when built without explicit arguments, the
CLI for its defaults) and hand explicit values on; nothing below them looks at the environment. A bad value
raises ``ValueError`` naming the variable: ``SEGSERVE_TIMEOUT must be a positive integer, got 'lots'``.
``segserve info`` prints the effective settings; the README's "Serving" table lists them.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from segserve.hardware import gpu_present

PREFIX = "SEGSERVE_"


def comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,a"`` -> ``("a", "b")``: the one parser for comma-list options and environment variables."""
    return tuple(dict.fromkeys(item.strip() for item in (text or "").split(",") if item.strip()))


def _trt_cache_default() -> Path:
    return Path.home() / ".cache" / "segserve" / "tensorrt"


def _cache_default() -> Path:
    return Path.home() / ".cache" / "segserve"


def _slots_default() -> int:
    """One model call at a time on a CPU (one call already uses every core); two on a GPU (copy and compute of
    consecutive requests overlap)."""
    return 2 if gpu_present() else 1


class Settings(BaseSettings):
    """segserve's knobs; each field ``name`` is set by the environment variable ``SEGSERVE_NAME``."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    model: Path | None = Field(None, description="the .onnx model to serve (default: the shipped default model)")
    models: Path | None = Field(
        None, description="a model repository folder (NAME/VERSION/model.onnx or NAME.onnx): serve every model in "
        "it, with versions and hot reload; replaces SEGSERVE_MODEL"
    )  # fmt: skip
    max_loaded: PositiveInt = Field(3, description="models of the repository held in memory at once (LRU)")
    models_poll: PositiveFloat = Field(2.0, description="seconds between scans of the model repository")
    providers: str | None = Field(
        None, description="comma list of onnxruntime providers (default: TensorRT, CUDA, CPU as available)"
    )
    trt_cache: Path = Field(
        default_factory=_trt_cache_default,
        description="folder for TensorRT engines and timings (default ~/.cache/segserve/tensorrt)",
    )
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="inference engine (auto: the fastest here, measured at start-up and cached)"
    )
    precision: Literal["auto", "fp32", "int8", "bf16", "fp16"] = Field(
        "auto", description="inference precision (auto: the fastest of those that keep the labels)"
    )
    scale: Literal["model", "native"] = Field(
        "model",
        description="model: an image larger than the model's training frames is resampled to their scale (the "
        "card's image_size) and answered at full size; native: every image runs at its own size, tiled when large",
    )
    cache_dir: Path | None = Field(
        default_factory=_cache_default,
        description="where the measured engine choice is kept (default ~/.cache/segserve)",
    )
    max_pixels: PositiveInt = Field(
        150_000_000, description="largest image accepted, width x height (larger: refused from its header, HTTP 413)"
    )
    inference_slots: PositiveInt = Field(
        default_factory=_slots_default, description="model calls at a time (default: 1 on CPU, 2 with a GPU)"
    )
    threads: PositiveInt | None = Field(None, description="onnxruntime intra-op threads (default: all cores)")
    timeout: PositiveInt = Field(120, description="seconds a request may take, upload included (then 504)")
    max_concurrency: PositiveInt = Field(
        64, description="requests being processed (uploads complete) before the server answers 503 with Retry-After"
    )
    body_timeout: PositiveFloat = Field(
        30.0, description="seconds a client has to send its whole request body (then 408); stalled uploads hold no slot"
    )
    max_body_bytes: PositiveInt = Field(256_000_000, description="largest request body accepted (larger: 413)")
    max_uploads: PositiveInt = Field(512, description="request bodies being received at once (more: 503)")
    api_key: SecretStr | None = Field(
        None, description="when set, every endpoint but the open paths requires `Authorization: Bearer <key>`"
    )
    open_paths: str = Field("/livez,/readyz,/metrics", description="comma list of paths that need no API key")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of ``environ`` alone (default: the process environment), checked."""
        try:
            if environ is None:
                return cls()
            given = {name: environ[key] for name, key in cls.variables().items() if environ.get(key)}
            return _GivenOnly(**given)
        except ValidationError as error:
            raise ValueError(_explain(error)) from None

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: PREFIX + name.upper() for name in cls.model_fields}

    @property
    def provider_list(self) -> tuple[str, ...] | None:
        return comma_list(self.providers) or None

    @property
    def open_path_set(self) -> frozenset[str]:
        return frozenset(comma_list(self.open_paths))

    def described(self) -> list[dict[str, Any]]:
        """Each variable with its effective value and what it does (``segserve info``, README)."""
        return [
            {"variable": variable, "value": _plain(getattr(self, name)),
             "description": type(self).model_fields[name].description}
            for name, variable in self.variables().items()
        ]  # fmt: skip


class _GivenOnly(Settings):
    """Settings from explicit values only: a mapping handed to ``from_env`` must not mix with ``os.environ``."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **others: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _plain(value: object) -> object:
    if isinstance(value, SecretStr):
        return "(set)"  # never printed
    return str(value) if isinstance(value, os.PathLike) else value


def _explain(error: ValidationError) -> str:
    """The first problem as ``SEGSERVE_NAME must be ..., got 'value'`` (no pydantic URL)."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    field = Settings.model_fields.get(name)
    types = _leaf_types(field.annotation) if field is not None else set()
    expected = "a positive number" if float in types else "a positive integer" if int in types else "valid"
    return f"{PREFIX}{name.upper()} must be {expected}, got {first.get('input')!r}"


def _leaf_types(hint: object) -> set[object]:
    """``int | None``, ``Annotated[int, ...]`` -> {int, NoneType}."""
    arguments = typing.get_args(hint)
    if not arguments:
        return {hint}
    if typing.get_origin(hint) is typing.Annotated:
        return _leaf_types(arguments[0])
    return set().union(*(_leaf_types(argument) for argument in arguments))
