"""What TensorRT will do with a finished graph, read from the graph itself (no TensorRT needed).

- `checker.py`: the Q/DQ rules of TensorRT 10 and onnx-tensorrt (ARCHITECTURE.md section 3), naming the node;
- `precision_map.py`: the precision each compute layer gets in a strongly typed build (INT8/INT4/FP16/FP32);
- `speed_model.py`: the roofline prediction of a step's time per GPU from the precision map.

May import: `exporter.passes` (the recipe, names), `exporter.onnx`, `exporter.errors`. Never `exporter.stages`
or `engines`.
"""
