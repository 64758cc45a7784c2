"""Check a finished ONNX graph against the Q/DQ rules TensorRT 10 imposes (ARCHITECTURE.md section 3).

TensorRT's ONNX parser accepts only explicit, symmetric quantization with build-time constant scales;
a graph that breaks a rule either fails to parse or builds silently slower (unfused Q/DQ). This checker
names the node, so the export fails before a user finds out on a GPU. Runnable alone:

    python -m exporter.tensorrt.checker dit.onnx [more.onnx ...]     # exit 1 when a rule is broken
    python -m exporter.tensorrt.checker dit.onnx --precision-map --latents 1024   # + what TensorRT runs each layer in

With `--precision-map` it also prints, per compute layer, the precision a strongly typed TensorRT build runs
it in and its share of the step's FLOPs (exporter/tensorrt/precision_map.py), and fails (exit 1) when a quantized
GEMM, an attention MatMul or a Softmax of a quantized graph would run in FP32.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.passes.recipe import TRT_INT4_BLOCKS
from exporter.tensorrt import fp4_rules

UNSUPPORTED = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
               "MatMulIntegerToFloat", "MatMulNBits")
# normalisations and softmax run unquantized: TensorRT's developer guide ("Q/DQ Layer-Placement
# Recommendations") quantizes the inputs of GEMM/convolution layers only, and a DQ feeding a normalisation
# leaves an unfused Q/DQ pair (an INT8 -> float reformat) in front of it
FLOAT_ONLY = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "Sin", "Cos")


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}: {self.detail}"


def check_graph(model: onnx.ModelProto, block_sizes: tuple[int, ...] = TRT_INT4_BLOCKS) -> list[Violation]:
    """Every Q/DQ rule a graph breaks. `block_sizes`: the INT4 block sizes accepted."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    bad: list[Violation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    quantized_tensors: dict[str, str] = {}
    for n in g.node:
        if n.domain == "trt" and n.op_type == fp4_rules.QUANTIZER:
            continue  # TensorRT's NVFP4 quantizer: exporter/tensorrt/fp4_rules.py
        if n.domain not in ("", "ai.onnx") or n.op_type in UNSUPPORTED:
            bad.append(Violation("unsupported op", n.name, f"{n.domain or 'ai.onnx'}::{n.op_type} cannot be parsed by "
                                 "TensorRT (no QLinear*/*Integer/DynamicQuantizeLinear/contrib ops)"))
            continue
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not fp4_rules.is_fp4_dq(n, inits, producers):
            bad.extend(_check_qdq(n, inits, opset, block_sizes))
        if n.op_type == "QuantizeLinear":
            if n.input[0] in quantized_tensors:
                bad.append(Violation("shared Q/DQ", n.name, f"{n.input[0]} is already quantized by "
                                     f"{quantized_tensors[n.input[0]]}; readers of one tensor share one Q/DQ"))
            quantized_tensors[n.input[0]] = n.name
            if n.input[0] in inits:
                bad.append(Violation("weights as constants", n.name, "quantize weights offline: store them "
                                     "quantized and feed the DQ directly"))
            elif _numel(inits.get(n.input[1])) != 1:
                bad.append(Violation("per-tensor activations", n.name, "activation scales must be per tensor"))
            for user in users.get(n.output[0], []):
                if user.op_type != "DequantizeLinear":
                    bad.append(Violation("Q->DQ pairs", n.name, f"Q output feeds {user.op_type} {user.name}, not a DQ"))
        if n.op_type in ("MatMul", "Gemm"):
            bad.extend(_check_matmul(n, producers, inits))
        if n.op_type == "Conv":
            bad.extend(_check_conv(n, producers, inits))
        if n.op_type in FLOAT_ONLY:
            for i in n.input:
                p = producers.get(i)
                if p is not None and p.op_type == "DequantizeLinear":
                    bad.append(Violation("float islands", n.name, f"{n.op_type} must run unquantized, its input "
                                         f"{i} comes from DQ {p.name}"))
    from exporter.tensorrt.attention_rules import check_attention

    bad.extend(Violation(*v) for v in check_attention(model))
    from exporter.tensorrt.residual_rules import residual_adds

    bad.extend(Violation("residual Q/DQ", name, why) for name, why in residual_adds(model)[1])
    bad.extend(Violation(*v) for v in fp4_rules.check_fp4(model))
    for out in g.output:
        p = producers.get(out.name)
        if p is not None and p.op_type in ("QuantizeLinear", "DequantizeLinear"):
            bad.append(Violation("outputs unquantized", p.name, f"graph output {out.name} comes from {p.op_type}"))
    return bad


def _numel(t: onnx.TensorProto | None) -> int:
    return -1 if t is None else int(np.prod(t.dims, dtype=np.int64))


def _check_qdq(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], opset: int,
               block_sizes: tuple[int, ...]) -> list[Violation]:
    bad = []
    scale = inits.get(n.input[1]) if len(n.input) > 1 else None
    if scale is None:
        return [Violation("constant scales", n.name, f"scale {n.input[1] if len(n.input) > 1 else '?'} is not a "
                          "build-time constant initializer (a runtime scale input is not supported)")]
    values = numpy_helper.to_array(scale).astype(np.float64)
    if not (np.isfinite(values).all() and (values > 0).all()):
        bad.append(Violation("positive scales", n.name, f"scale {scale.name} has values <= 0 or non-finite "
                             f"(min {values.min():.3g})"))
    if len(n.input) > 2 and n.input[2]:
        zp = inits.get(n.input[2])
        if zp is None:
            bad.append(Violation("symmetric", n.name, f"zero point {n.input[2]} is not a constant"))
        else:
            if zp.data_type in (TensorProto.UINT8, TensorProto.UINT4):
                bad.append(Violation("no UINT8", n.name, f"zero point {zp.name} is unsigned (asymmetric / UINT8)"))
            if np.any(numpy_helper.to_array(zp).astype(np.int64) != 0):
                bad.append(Violation("symmetric", n.name, f"zero point {zp.name} is not zero"))
    elif n.op_type == "QuantizeLinear" and not any(a.name == "output_dtype" for a in n.attribute):
        bad.append(Violation("no UINT8", n.name, "QuantizeLinear without an INT8 zero point outputs UINT8"))
    if n.op_type == "DequantizeLinear" and n.input[0] in inits:
        w = inits[n.input[0]]
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if w.data_type == TensorProto.FLOAT8E4M3FN:
            # FP8 Q/DQ came with opset 19; TensorRT quantizes FP8 as castToFp8(clip(x / s, -448, 448)) with s
            # "a 16-bit or 32-bit floating point scalar" (developer guide, "Quantization Schemes"), and NVIDIA's
            # FP8 recipe exports per-tensor weight scales (ModelOpt FP8_DEFAULT_CFG, `axis: None`)
            if opset < 19:
                bad.append(Violation("FP8 opset", n.name, f"FP8 Q/DQ needs opset >= 19, graph has {opset}"))
            if _numel(scale) != 1:
                bad.append(Violation("FP8 per tensor", n.name, f"FP8 weight {w.name} must have one scale, has "
                                     f"{_numel(scale)}"))
        elif w.data_type == TensorProto.INT4:
            if opset < 21:
                bad.append(Violation("INT4 opset", n.name, f"INT4 block quantization needs opset >= 21, graph has {opset}"))
            if block not in block_sizes:
                bad.append(Violation("INT4 blocks", n.name, f"TensorRT's INT4 weight-only GEMM takes block sizes "
                                     f"{' or '.join(map(str, block_sizes))}, got {block}"))
            if w.dims[-1] % 2:
                bad.append(Violation("INT4 even dims", n.name, f"INT4 weight {w.name} has an odd last dimension"))
        elif w.data_type != TensorProto.INT8:
            bad.append(Violation("weight type", n.name, f"weight {w.name} is {TensorProto.DataType.Name(w.data_type)}"))
    elif n.op_type == "DequantizeLinear" and n.input[0] not in inits:
        if _numel(scale) != 1:
            bad.append(Violation("per-tensor activations", n.name, "activation DQ scale must be per tensor"))
    return bad


def _check_matmul(n: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                  ) -> list[Violation]:
    dq = [producers.get(i) if producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" else None
          for i in n.input[:2]]
    if not any(dq):
        return []
    weight_types = [inits[p.input[0]].data_type for p in dq if p is not None and p.input[0] in inits]
    act_dq = [p for p in dq if p is not None and p.input[0] not in inits]
    if len(act_dq) == 2:
        return []  # an attention MatMul (activation x activation): exporter/tensorrt/attention_rules.py
    if TensorProto.INT8 in weight_types and not act_dq:
        return [Violation("Q/DQ on both inputs", n.name, "an INT8 weight needs an INT8 activation Q/DQ on the "
                          "other MatMul input (only INT4 weights may be weight-only)")]
    fp8_weight = TensorProto.FLOAT8E4M3FN in weight_types
    if weight_types and act_dq and fp8_weight != all(_zero_point_type(p, inits) == TensorProto.FLOAT8E4M3FN
                                                    for p in act_dq):
        return [Violation("one quantized type", n.name, "weight and activation Q/DQ of a GEMM must both be FP8 "
                          "or both INT8 (TensorRT has no mixed INT8 x FP8 GEMM)")]
    if fp8_weight and not act_dq:
        return [Violation("Q/DQ on both inputs", n.name, "an FP8 weight needs an FP8 activation Q/DQ on the "
                          "other MatMul input")]
    if act_dq and not weight_types:
        return [Violation("Q/DQ on both inputs", n.name, "activation is quantized but the weight has no DQ")]
    return []


def _check_conv(n: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                ) -> list[Violation]:
    """A quantized convolution: the GEMM rules on (x, W), and the weight's scales along the output channels.

    onnx-tensorrt's DequantizeLinear importer takes a per-channel weight scale only on the axis TensorRT's
    convolution quantizes: the output channels, axis 0 of [O, I, kh, kw] (developer guide, "Quantization
    Schemes": "convolution ... weights quantized per output channel"; axis 1 is ConvTranspose's)."""
    bad = _check_matmul(n, producers, inits)
    dq = producers.get(n.input[1])
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
        scale = inits.get(dq.input[1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if _numel(scale) > 1 and axis != 0:
            bad.append(Violation("Conv weights per output channel", dq.name, f"Conv weight scales on axis {axis}; "
                                 "TensorRT quantizes convolution weights per output channel (axis 0)"))
    return bad


def _zero_point_type(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    """The quantized type of a DQ: its zero point's (INT8 when it has none, as QuantizeLinear defaults)."""
    zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    return zp.data_type if zp is not None else TensorProto.INT8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check ONNX graphs against TensorRT's Q/DQ rules.")
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--precision-map", action="store_true",
                        help="print the precision TensorRT runs each compute layer in and its FLOP share")
    parser.add_argument("--latents", type=int, default=1024,
                        help="latent length (DiT) or latent frames (UNet) the FLOPs are counted at")
    parser.add_argument("--batch", type=int, default=2, help="batch the FLOPs are counted at (CFG: 2)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.graphs:
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        model = onnx.load(str(path), load_external_data=False)
        problems: list = check_graph(model)
        if args.precision_map:
            from exporter.tensorrt.precision_map import precision_map

            pmap = precision_map(model, latents=args.latents, batch=args.batch, extra_dims={"frames": args.latents})
            print(pmap.table())
            share = ", ".join(f"{k} {100 * v:.1f}%" for k, v in pmap.flop_share().items())
            print(f"{path.name}: {sum(x.flops for x in pmap.layers) / 1e9:.1f} GFLOP at {args.latents} latents, "
                  f"batch {args.batch}: {share}; attention cores fusable {pmap.fusable_attention_cores}/"
                  f"{pmap.attention_cores} (fused FP8 MHA: {pmap.fp8_attention_cores})")
            problems = problems + [f"precision: {v}" for v in pmap.violations]
        for p in problems:
            print(f"{path.name}: {p}")
        print(f"{path.name}: {'FAIL' if problems else 'ok'} ({len(problems)} violations)")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
