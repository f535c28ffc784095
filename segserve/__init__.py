"""segserve: fully convolutional semantic segmentation, from torchvision classifiers to an HTTP service.

Importing this package is cheap on purpose: it imports neither torch (the training side, ``segserve.models``)
nor onnxruntime (the serving side), so each side pays only for what it uses.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
