"""Tiny ONNX models built with onnx.helper, for tests that need member files but no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear(
    path: Path,
    in_dim: int = 4,
    out_dim: int = 3,
    seed: int = 0,
    input_name: str = "x",
    output_name: str = "y",
    batch: int | str = "batch",
    elem_type: int = TensorProto.FLOAT,
) -> Path:
    """y = x @ W + b with a dynamic (or, if ``batch`` is an int, fixed) first dimension."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(in_dim, out_dim)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(out_dim,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], [output_name]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, elem_type, [batch, in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, out_dim])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
