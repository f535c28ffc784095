"""The serving side: run exported models with onnxruntime. Never imports torch."""

from segserve.modelcard import ModelFileError, ModelMetadata
from segserve.runtime.images import ImageError, ImageTooLarge, read_image
from segserve.runtime.segmenter import Segmentation, Segmenter, default_model_path
from segserve.runtime.session import LoadedModel, choose_providers, load_model

__all__ = [
    "ImageError",
    "ImageTooLarge",
    "LoadedModel",
    "ModelFileError",
    "ModelMetadata",
    "Segmentation",
    "Segmenter",
    "choose_providers",
    "default_model_path",
    "load_model",
    "read_image",
]
