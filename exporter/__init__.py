"""quadit exporter: model families, torch -> ONNX export, quantization passes and TensorRT analysis.

Rooms (each `__init__` says what it may import): `models` <- `onnx` <- `passes` <- `tensorrt` <- `stages`.
`errors.py` is the shared leaf. Imports point one way: engines -> exporter -> calibration.
"""
