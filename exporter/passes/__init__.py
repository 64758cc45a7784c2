"""The quantization passes over an exported FP32 DiT graph, one module per pass, and the recipe that drives them.

- `recipe.py`: `Recipe`, the validated configuration of a quantized export (scheme, method, alpha, rank ...);
- `quantize.py`: `quantize_dit`, which runs the passes below on the DiT's Linears, in order;
- `smoothing.py`, `alpha_search.py`: (timestep-aware) SmoothQuant scales and their searched strength;
- `act_scales.py`, `gptq.py`, `lowrank.py`, `qdq.py`: activation scales, GPTQ rounding, the SVD low-rank
  branch and the Q/DQ arithmetic;
- `scale_fold.py`, `int8_attention.py`, `ort_fusion.py`: graph rewrites for the ONNX Runtime target;
- `names.py`: every tensor and node name a pass adds.

May import: `exporter.onnx`, `exporter.models`, `exporter.errors`, `calibration`. Never `exporter.tensorrt`,
`exporter.stages` or `engines`.
"""
