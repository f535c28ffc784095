"""The torch side of segserve (``pip install 'segserve[train]'``): backbones, convolutionalization, FCNs.

>>> from segserve.models import build_fcn, convolutionalize
>>> fcn = build_fcn("resnet18", variant="8s", num_classes=11)           # logits N x 11 x H x W
>>> heatmap_net = convolutionalize(torchvision.models.vgg16())         # N x 1000 x h x w class heatmaps
"""

from segserve.models.backbones import (
    BACKBONES,
    Backbone,
    Tap,
    WeightsArg,
    WeightsError,
    get_backbone,
    load_classifier,
)
from segserve.models.convolutionalize import ConvolutionalizedClassifier, convolutionalize
from segserve.models.fcn import FCN, VARIANTS, build_fcn
from segserve.models.trunk import Trunk
from segserve.models.upsample import SubPixelDeconvolution, bilinear_kernel, bilinear_upsampler, subpixel_deconvolutions

__all__ = [
    "BACKBONES",
    "FCN",
    "VARIANTS",
    "Backbone",
    "ConvolutionalizedClassifier",
    "SubPixelDeconvolution",
    "Tap",
    "Trunk",
    "WeightsArg",
    "WeightsError",
    "bilinear_kernel",
    "bilinear_upsampler",
    "build_fcn",
    "convolutionalize",
    "get_backbone",
    "load_classifier",
    "subpixel_deconvolutions",
]
