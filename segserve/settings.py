"""Every environment variable segserve reads, its default and its check: one typed object (pydantic-settings).

The faces read it once (the service at start-up, ``Segmenter()`` when built without explicit arguments, the
CLI for its defaults) and hand explicit values on; nothing below them looks at the environment. A bad value
raises ``ValueError`` naming the variable: ``SEGSERVE_TIMEOUT must be a positive integer, got 'lots'``.
``segserve info`` prints the effective settings; the README's "Serving" table lists them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from segserve.hardware import gpu_present

PREFIX = "SEGSERVE_"


def comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,a"`` -> ``("a", "b")``: the one parser for comma-list options and environment variables."""
    return tuple(dict.fromkeys(item.strip() for item in (text or "").split(",") if item.strip()))


def _trt_cache_default() -> Path:
    return Path.home() / ".cache" / "segserve" / "tensorrt"


def _slots_default() -> int:
    """One model call at a time on a CPU (one call already uses every core); two on a GPU (copy and compute of
    consecutive requests overlap)."""
    return 2 if gpu_present() else 1


class Settings(BaseSettings):
    """segserve's knobs; each field ``name`` is set by the environment variable ``SEGSERVE_NAME``."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    model: Path | None = Field(None, description="the .onnx model to serve (default: the shipped default model)")
    providers: str | None = Field(
        None, description="comma list of onnxruntime providers (default: TensorRT, CUDA, CPU as available)"
    )
    trt_cache: Path = Field(
        default_factory=_trt_cache_default,
        description="folder for TensorRT engines and timings (default ~/.cache/segserve/tensorrt)",
    )
    max_pixels: PositiveInt = Field(
        150_000_000, description="largest image accepted, width x height (larger: refused from its header, HTTP 413)"
    )
    inference_slots: PositiveInt = Field(
        default_factory=_slots_default, description="model calls at a time (default: 1 on CPU, 2 with a GPU)"
    )
    threads: PositiveInt | None = Field(None, description="onnxruntime intra-op threads (default: all cores)")
    timeout: PositiveInt = Field(120, description="seconds a request may take")
    max_concurrency: PositiveInt = Field(64, description="requests in flight before the server answers 503")

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
    return str(value) if isinstance(value, os.PathLike) else value


def _explain(error: ValidationError) -> str:
    """The first problem as ``SEGSERVE_NAME must be ..., got 'value'`` (no pydantic URL)."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    expected = "a positive integer" if "int" in first["type"] or "greater" in first["type"] else "valid"
    return f"{PREFIX}{name.upper()} must be {expected}, got {first.get('input')!r}"
