"""The runtime: prompt -> text encoder -> sampler loop -> VAE decode -> WAV, over interchangeable backends.

- `pipeline.py`: `Pipeline`, which steps the model family's own sampler;
- `backends.py`: the PyTorch and ONNX Runtime backends (one `Backend` protocol);
- `providers.py`: ONNX Runtime execution providers and session options;
- `tensorrt.py`: TensorRT engines for an export (built with Polygraphy) and their backend;
- `durations.py`, `estimate.py`: audio durations the model can take; time estimates of long stages.

May import: `exporter`, `calibration`. Never another `engines` room.
"""
