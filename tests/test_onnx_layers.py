"""Every quantizable Linear maps to exactly one MatMul/Gemm of the exported DiT, holding its weight."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporter.models.layers import quantizable_linears
from exporter.onnx.linear_nodes import locate_linears, weight_out_in


def test_each_quantizable_linear_has_one_site_with_its_weight(mini, mini_export):
    out, _ = mini_export
    model = onnx.load(str(out / "dit.onnx"))
    layers = quantizable_linears(mini.dit)
    sites = locate_linears(model, list(layers))
    assert len(sites) == len(layers) == 42
    assert len({s.node for s in sites.values()}) == 42
    for name, linear in layers.items():
        np.testing.assert_array_equal(weight_out_in(model, sites[name]), linear.weight.detach().numpy())
    assert {s.op_type for s in sites.values()} <= {"MatMul", "Gemm"}
    with pytest.raises(ValueError, match="transformer.layers.99.ff.ff.2"):
        locate_linears(model, ["transformer.layers.99.ff.ff.2"])
