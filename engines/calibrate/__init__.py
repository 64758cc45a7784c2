"""The calibration driver: the PyTorch model through the runtime's own sampler loop with the collector hooked.

- `driver.py`: `calibrate`, resumable, data-parallel under torchrun, writing the calibration artifact.

May import: `engines.runtime`, `exporter`, `calibration`.
"""
