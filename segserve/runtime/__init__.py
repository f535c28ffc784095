"""The serving side: run exported models with onnxruntime. Never imports torch."""

from segserve.modelcard import ModelFileError, ModelMetadata
from segserve.runtime.session import LoadedModel, choose_providers, load_model

__all__ = ["LoadedModel", "ModelFileError", "ModelMetadata", "choose_providers", "load_model"]
