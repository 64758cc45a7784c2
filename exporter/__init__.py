"""quadit exporter: model presets and loading, synthetic weights, and torch -> ONNX export."""
