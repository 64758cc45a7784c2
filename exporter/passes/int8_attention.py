"""INT8 attention scores for the ONNX Runtime target: Q·Kᵀ as DynamicQuantizeLinear + MatMulInteger.

The weight GEMMs are INT8 after quantization; the attention core's activation-by-activation MatMuls are
not. This pass (recipe `attention_int8 = "dynamic-qk"`) quantizes the score MatMul's two inputs at run
time, each to uint8 with one scale and zero point for the whole tensor (DynamicQuantizeLinear: what ONNX
Runtime computes per call, so no calibration is needed and the range follows every timestep), multiplies
in integers (MatMulInteger, u8 x u8 -> int32) and rescales by the product of the two scales:

    scores = (q_u8 - zq) · (k_u8 - zk) * sq * sk   with Q and Kᵀ already scaled by sqrt(1/sqrt(D)) each

The probabilities·V MatMul stays float: softmax outputs span [0, 1] with most mass in entries far below
1/255, which one uint8 scale per tensor would round to zero. TensorRT cannot take it (its MHA fusion
wants Q/DQ with constant scales, and a DynamicQuantizeLinear is not a TensorRT layer), so the recipe check
refuses it for the TensorRT target; the rewritten cores no longer match the fused-attention pattern, so
they run as these ops rather than MultiHeadAttention. Whether it pays: `scripts/bench.py` times the
candidate "ort w8a8 dynamic (dql) int8 attention", `scripts/compare_methods.py --recipe-row` its accuracy.
"""
from __future__ import annotations

from onnx import TensorProto, helper

from exporter.onnx import graph_edit
from exporter.passes.ort_fusion import find_attention


def quantize_attention_scores(model) -> tuple[object, int]:
    """Rewrite every matched attention core's Q·Kᵀ (in place); returns (model, cores rewritten)."""
    sites = find_attention(model)
    producer = graph_edit.producers(model)
    for k, site in enumerate(sites):
        softmax = next(n for n in model.graph.node if n.name == site.softmax)
        scores = producer[softmax.input[0]]
        base = f"quadit.attention{k}.qk_int8"
        parts = []
        for side, tensor in (("q", scores.input[0]), ("k", scores.input[1])):
            parts.append([f"{base}.{side}_u8", f"{base}.{side}_scale", f"{base}.{side}_zero"])
            model.graph.node.append(helper.make_node("DynamicQuantizeLinear", [tensor], parts[-1],
                                                     name=f"{base}.{side}_dql"))
        (qq, qs, qz), (kq, ks, kz) = parts
        model.graph.node.extend([
            helper.make_node("MatMulInteger", [qq, kq, qz, kz], [f"{base}.int32"], name=f"{base}.matmul"),
            helper.make_node("Cast", [f"{base}.int32"], [f"{base}.float"], name=f"{base}.cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [qs, ks], [f"{base}.scale"], name=f"{base}.scale_mul"),
            helper.make_node("Mul", [f"{base}.float", f"{base}.scale"], [softmax.input[0]], name=f"{base}.rescale"),
        ])
        model.graph.node.remove(scores)
    graph_edit.toposort(model)
    return model, len(sites)
