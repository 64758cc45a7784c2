"""A roofline PREDICTION of a TensorRT engine's DiT or UNet step from the graph's precision map (nothing is timed).

Each compute layer takes max(FLOPs / (peak of its precision x COMPUTE_EFFICIENCY), bytes / (memory
bandwidth x MEMORY_EFFICIENCY)); the layers are summed, plus the memory traffic of the elementwise ops
between them (residual adds, gates, RoPE, casts, quantizers), with connected elementwise ops fused into one
kernel as TensorRT's pointwise fusion does (exporter/tensorrt/precision_map.py, `pointwise_bytes`). Launch overheads
are left out (CUDA graphs hide most of them), so the figures are lower bounds for small models.

Attention: where the precision map says an attention core is fusable (Q.K^T -> Softmax -> .V in one type,
no Cast), it runs as TensorRT's fused MHA: FLOPs of the two batched MatMuls on FP16 tensor cores, bytes of
Q, K, V and the output only (the score matrix never leaves the chip). INT8 attention is not fused beyond 512
tokens (TensorRT developer guide, MHA fusion: INT8 needs sequence lengths <= 512 and head size 16/32/64),
so INT8 BMMs at SAO's 1025 tokens are costed unfused, with the score matrix written and read.
FP8 attention (`--attention fp8`, exporter/passes/fp8_attention.py): where every core is a fused FP8 MHA (the
precision map's `fp8_attention_cores`), its two BMMs run at the FP8 peak and read Q, K and V as one byte each
(`attention_peak`); the softmax output's quantizer is inside the kernel and moves no data.

Peaks are NVIDIA's data-sheet figures without sparsity (the sheets print sparse figures with an asterisk;
these are half of those):
- H100 SXM5 and H200 SXM (same GH100 compute): FP16/BF16 989.4 TFLOPS, INT8 1978.9 TOPS, TF32 494.7 TFLOPS;
  3.35 TB/s (H100, HBM3) and 4.8 TB/s (H200, HBM3e). NVIDIA H100 Tensor Core GPU datasheet; H200 datasheet.
- L40S: FP16 362.05 TFLOPS, INT8 733 TOPS, TF32 183 TFLOPS, 864 GB/s. NVIDIA L40S datasheet.
- RTX 4090: FP16 with FP32 accumulate 165.2 TFLOPS (330.3 with FP16 accumulate; TensorRT's FP16 GEMMs
  accumulate in FP32 by default), FP8 with FP32 accumulate 330.3 TFLOPS, INT8 660.6 TOPS, TF32 82.6 TFLOPS,
  1008 GB/s. NVIDIA Ada GPU architecture whitepaper, appendix table.
- FP8 (E4M3, dense): H100 / H200 1978.9 TFLOPS, L40S 733 TFLOPS (data sheets as above).
- B200 (Blackwell, one GPU of an HGX B200): FP16 2.25 PFLOPS, FP8 4.5 PFLOPS, INT8 4.5 POPS, TF32 1.1
  PFLOPS, 8 TB/s HBM3e, FP4 9 PFLOPS; NVIDIA HGX B200 datasheet, whose tensor figures are sparse (halved here).
- NVFP4 (E2M1 in 16-blocks, `--scheme nvfp4`): Blackwell only; the other GPUs here have no FP4 tensor cores, so
  their nvfp4 rows say "not supported" instead of a figure. An NVFP4 GEMM reads 0.5625 bytes per weight and per
  activation element (4 bits plus an E4M3 scale per 16); its activation quantizer is costed as an elementwise
  kernel reading the FP16 activation (TensorRT's DynamicQuantize layer).
INT4 weight-only GEMMs compute in FP16 (weights are expanded in the kernel), so they gain bandwidth, not
math: at 1024 latents and CFG batch 2 the DiT's GEMMs are compute bound, and the model says so.
Convolutions (the UNet family) are costed like GEMMs: an INT8 Conv (INT8 input and weight DQs) at the INT8 peak,
reading its INT8 input; FP16 ones at the FP16 peak. GroupNorm is an elementwise region (its bytes in `pointwise`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.tensorrt.precision_map import PrecisionMap

COMPUTE_EFFICIENCY = 0.70   # share of the tensor-core peak a large TensorRT GEMM reaches
MEMORY_EFFICIENCY = 0.80    # share of the data-sheet bandwidth a streaming kernel reaches


@dataclass(frozen=True)
class Gpu:
    name: str
    fp16_tflops: float
    int8_tops: float
    tf32_tflops: float
    bandwidth_tbs: float
    source: str
    fp8_tflops: float = 0.0  # 0: the GPU has no FP8 tensor cores
    fp4_tflops: float = 0.0  # 0: no FP4 tensor cores (before Blackwell)


    def peak(self, precision: str) -> float:
        """Operations per second for a layer of this precision-map group."""
        if precision.startswith("INT8"):
            return self.int8_tops * 1e12
        if precision.startswith("FP8"):
            if not self.fp8_tflops:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return self.fp8_tflops * 1e12
        if precision.startswith("NVFP4"):
            if not self.fp4_tflops:
                raise ValueError(f"{self.name} has no FP4 tensor cores (NVFP4 GEMMs need Blackwell)")
            return self.fp4_tflops * 1e12
        if precision.startswith("FP32"):
            return self.tf32_tflops * 1e12
        return self.fp16_tflops * 1e12  # FP16, BF16 and INT4 weight-only (FP16 compute)


GPUS = {
    "H100": Gpu("H100 SXM", 989.4, 1978.9, 494.7, 3.35, "NVIDIA H100 Tensor Core GPU datasheet (dense)", 1978.9),
    "H200": Gpu("H200 SXM", 989.4, 1978.9, 494.7, 4.8, "NVIDIA H200 Tensor Core GPU datasheet (dense)", 1978.9),
    "L40S": Gpu("L40S", 362.05, 733.0, 183.0, 0.864, "NVIDIA L40S datasheet (dense)", 733.0),
    "RTX 4090": Gpu("RTX 4090", 165.2, 660.6, 82.6, 1.008,
                    "NVIDIA Ada GPU architecture whitepaper (dense, FP32 accumulate)", 330.3),
    "B200": Gpu("B200", 2250.0, 4500.0, 1100.0, 8.0, "NVIDIA HGX B200 datasheet (per GPU; dense = half of sparse)",
                4500.0, 9000.0),
}
# published TensorRT speedups of quantized over FP16 engines, to hold the model against
PUBLISHED = [
    {"what": "ModelOpt SDXL 1.0 INT8 vs FP16 (1024x1024, 30 steps, TensorRT 9.3)", "speedup": "1.20-1.43x",
     "source": "NVIDIA TensorRT-Model-Optimizer examples/benchmark.md (RTX 4090 1.20x, L40S 1.25x, RTX 6000 Ada 1.43x)"},
    {"what": "Stability stable-audio-3 TensorRT FP8 vs fp16mixed DiT forward", "speedup": "1.10-1.32x",
     "source": "Stability-AI/stable-audio-3 PR #84 (H200, medium DiT, L=4096: 1.32x) and PR #89 (small DiTs: 1.10x)"},
]


def _layer_seconds(flops: float, nbytes: float, peak: float, gpu: Gpu) -> float:
    return max(flops / (peak * COMPUTE_EFFICIENCY), nbytes / (gpu.bandwidth_tbs * 1e12 * MEMORY_EFFICIENCY))


def attention_peak(pmap: PrecisionMap, gpu: Gpu) -> float:
    """The peak a fused MHA's two BMMs run at: FP8 where every core is a fused FP8 MHA (Q, Kᵀ, P, V in E4M3;
    exporter/passes/fp8_attention.py) and the GPU has FP8 tensor cores, else FP16. TensorRT 10.6 added FP8 MHA
    fusion on Ada for sequence lengths up to 3072 and head sizes up to 64 (TensorRT 10.6.0 release notes), which
    SAO's 1025 tokens of 64-wide heads fit; Hopper and Blackwell had it before."""
    if gpu.fp8_tflops and pmap.attention_cores and pmap.fp8_attention_cores == pmap.attention_cores:
        return gpu.fp8_tflops * 1e12
    return gpu.fp16_tflops * 1e12


def predict(pmap: PrecisionMap, gpu: Gpu) -> dict[str, float]:
    """Predicted milliseconds of one DiT call, split into GEMMs, attention, other compute and pointwise."""
    parts = {"weight_gemms": 0.0, "attention": 0.0, "norms_convs": 0.0, "pointwise": 0.0}
    fused = pmap.fusable_attention_cores == pmap.attention_cores and pmap.attention_cores > 0
    attention = [x for x in pmap.layers if x.kind in ("attention MatMul", "Softmax")]
    for x in pmap.layers:
        if x.kind == "weight GEMM":
            parts["weight_gemms"] += _layer_seconds(x.flops, x.bytes, gpu.peak(x.precision), gpu)
        elif x.kind in ("LayerNorm", "Conv"):
            parts["norms_convs"] += _layer_seconds(x.flops, x.bytes, gpu.peak(x.precision), gpu)
    int8_attention = any(x.precision.startswith("INT8") for x in attention)
    if fused and not int8_attention:
        matmuls = [x for x in attention if x.kind == "attention MatMul"]
        flops = sum(x.flops for x in matmuls)
        # fused MHA: Q, K, V in and O out; the first BMM's inputs are Q and K, the second's V and O is its output
        io = sum(pmap.attention_io_bytes.values()) if pmap.attention_io_bytes else sum(x.bytes for x in matmuls) / 2
        parts["attention"] = _layer_seconds(flops, io, attention_peak(pmap, gpu), gpu)
    else:
        for x in attention:
            parts["attention"] += _layer_seconds(x.flops, x.bytes, gpu.peak(x.precision), gpu)
    parts["pointwise"] = pmap.pointwise_bytes / (gpu.bandwidth_tbs * 1e12 * MEMORY_EFFICIENCY)
    out = {k: v * 1e3 for k, v in parts.items()}
    out["total_ms"] = sum(out.values())
    return out


def predict_all(pmaps: dict[str, PrecisionMap], gpus: tuple[str, ...] = tuple(GPUS), baseline: str = "fp16"
                ) -> dict[str, Any]:
    """{gpu: {candidate: {ms and parts, speedup vs baseline}}} for every candidate's precision map."""
    table: dict[str, Any] = {}
    for key in gpus:
        gpu = GPUS[key]
        rows = {}
        for name, pmap in pmaps.items():
            try:
                rows[name] = predict(pmap, gpu)
            except ValueError as exc:   # a precision this GPU has no tensor cores for
                rows[name] = {"unsupported": str(exc)}
        if baseline in rows and "total_ms" in rows[baseline]:
            for row in rows.values():
                if "total_ms" in row:
                    row["speedup_vs_fp16"] = rows[baseline]["total_ms"] / row["total_ms"]
        table[key] = rows
    return {"kind": "PREDICTION (roofline from the precision map; not a measurement)", "gpus": table,
            "assumptions": {"compute_efficiency": COMPUTE_EFFICIENCY, "memory_efficiency": MEMORY_EFFICIENCY,
                            "peaks": {k: vars(g) for k, g in GPUS.items() if k in gpus}},
            "published": PUBLISHED}


def markdown(prediction: dict[str, Any], latents: int, batch: int, what: str | None = None) -> str:
    """The prediction as a Markdown table; `what` names the step (default: "DiT step at <latents> latents")."""
    candidates = list(next(iter(prediction["gpus"].values())))
    head = "| GPU | " + " | ".join(f"{c} ms" for c in candidates) + " | " + \
        " | ".join(f"{c} vs fp16" for c in candidates if c != "fp16") + " |"
    what = what or f"DiT step at {latents} latents"
    rows = [f"PREDICTION (roofline, not measured): {what}, CFG batch {batch}", "", head,
            "|" + "---|" * (1 + 2 * len(candidates) - 1)]
    for gpu, cands in prediction["gpus"].items():
        rows.append(f"| {GPUS[gpu].name} | " + " | ".join(_ms(cands[c]["total_ms"]) if "total_ms" in cands[c]
                                                        else "n/a" for c in candidates) + " | " +
                    " | ".join(f"{cands[c]['speedup_vs_fp16']:.2f}x" if "speedup_vs_fp16" in cands[c]
                               else "not supported" for c in candidates if c != "fp16") + " |")
    return "\n".join(rows)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"  # a small UNet's step is tens of microseconds
