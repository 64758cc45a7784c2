"""Measuring exports: accuracy against FP32, the peers at equal bits, checks, sensitivity and benchmarks.

- `accuracy.py`, `compare.py`: the held-out-prompt accuracy report (step SQNR, final latents) and its candidates;
- `modelopt_baseline.py`, `ort_quantizer_baseline.py`: NVIDIA ModelOpt and ONNX Runtime's quantizer as peers;
- `check.py`, `polygraphy_loader.py`: Polygraphy comparisons of a deployed DiT against FP32;
- `unet_check.py`: a UNet-family export's FP32 graphs against the PyTorch modules they came from;
- `sensitivity.py`, `auto_precision.py`: per-layer sensitivity and the mixed precision chosen from it;
- `ort_profile.py`, `bench*.py`, `compare_methods.py`, `compare_table.py`, `attention_study.py`,
  `tune_ort_session.py`: benchmarks and studies (JSON + Markdown + PNG).

May import: `engines.runtime`, `engines.calibrate`, `exporter`, `calibration`. Never `engines.serving` or
`engines.cli`.
"""
