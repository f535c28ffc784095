"""The serving side: run exported models with onnxruntime. Never imports torch."""

from segserve.images import ImageError, ImageTooLarge, read_image
from segserve.modelcard import ModelFileError, ModelMetadata
from segserve.runtime.segmenter import SegmentationResult, Segmenter, default_model_path, shipped_model_folders
from segserve.runtime.session import LoadedModel, choose_providers, load_model

__all__ = [
    "ImageError",
    "ImageTooLarge",
    "LoadedModel",
    "ModelFileError",
    "ModelMetadata",
    "SegmentationResult",
    "Segmenter",
    "choose_providers",
    "default_model_path",
    "load_model",
    "read_image",
    "shipped_model_folders",
]
