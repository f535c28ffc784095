"""FLOPs of an ONNX graph at one input, counted from the graph: every Conv, ConvTranspose, MatMul and Gemm.

Shapes of a dynamic graph are only known once it runs, so the counter exposes the inputs and outputs of those
nodes as extra graph outputs, runs the graph once in onnxruntime and reads the shapes. A multiply-add is 2 FLOPs.
A convolution tap whose weights are zero for every input channel of an output channel is not counted: those are
the structural zeros of a transposed convolution in sub-pixel form (segserve.models.upsample), so the model's
count does not depend on which of the two equivalent forms the file holds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def onnx_flops(path: str | Path, feed: dict[str, np.ndarray]) -> float:
    model = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {name: array.shape for name, array in arrays.items()}
    nodes = [n for n in model.graph.node if n.op_type in {"Conv", "ConvTranspose", "MatMul", "Gemm"}]
    wanted = {name for n in nodes for name in (n.input[0], n.output[0])}
    existing = {o.name for o in model.graph.output}
    for name in sorted(wanted - existing - set(weights)):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = dict(zip(names, (a.shape for a in session.run(names, feed)), strict=True))
    shapes.update(weights)
    total = 0.0
    for node in nodes:
        kernel = shapes.get(node.input[1]) if len(node.input) > 1 else None
        out, inp = shapes.get(node.output[0]), shapes.get(node.input[0])
        if kernel is None or out is None or inp is None:
            continue
        if node.op_type == "Conv":  # kernel: Cout x Cin/g x kh x kw
            array = arrays.get(node.input[1])
            taps = int(np.any(array != 0, axis=1).sum()) if array is not None else math.prod(kernel) // kernel[1]
            total += 2 * math.prod(out) // out[1] * taps * kernel[1]
        elif node.op_type == "ConvTranspose":  # kernel: Cin x Cout/g x kh x kw; every input pixel scatters
            total += 2 * math.prod(inp) * math.prod(kernel[1:])
        else:  # MatMul / Gemm: out has M x N, kernel K x N
            total += 2 * math.prod(out) * kernel[0]
    return total


def onnx_parameters(path: str | Path) -> int:
    """Weights in the graph's float and int8 initializers, less the structural zero taps of convolutions (as in
    :func:`onnx_flops`: a sub-pixel deconvolution counts what its transposed convolution holds)."""
    model = onnx.load(str(path))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    total = 0
    for initializer in model.graph.initializer:
        if initializer.data_type not in (1, 10, 3, 2):
            continue
        total += math.prod(initializer.dims)
        if initializer.name in conv_weights and len(initializer.dims) == 4:
            array = numpy_helper.to_array(initializer)
            total -= int((~np.any(array != 0, axis=1)).sum()) * array.shape[1]
    return int(total)
