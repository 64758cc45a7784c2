"""The export stage: the rooms of `exporter` composed into an export directory.

- `export.py`: `export_model`, loaded model -> graphs, tokenizer, parity figures, manifest (atomically);
- `quantized.py`: `quantize_stage` / `quantize_graph`, FP32 DiT graph + calibration artifact + recipe -> quantized
  graph(s), checked against TensorRT's rules for `--target tensorrt`.

May import everything in `exporter` and `calibration`; never `engines`.
"""
