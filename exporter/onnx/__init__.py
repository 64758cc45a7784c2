"""torch -> ONNX: the graph modules, their FP16 copies, the dynamo export, graph editing and stage artifacts.

- `graphs.py`: the torch modules that become the exported graphs (DiT, text encoder, conditioners, VAE decoder);
- `fp16.py`: FP16 copies with the FP32 islands a strongly typed TensorRT build needs;
- `torch_export.py`: `torch.onnx.export(dynamo=True)`, opset / IR pinning, external data, ORT sessions;
- `linear_nodes.py`: each torch Linear's MatMul/Gemm in a dynamo graph (from its name-scope metadata);
- `graph_edit.py`: small helpers over an `onnx.ModelProto` (producers, consumers, initializers);
- `artifacts.py`: atomic output directories and the versioned export manifest.

May import: `exporter.models`, `exporter.errors`, `calibration`. Never `exporter.passes`, `exporter.tensorrt`,
`exporter.stages` or `engines`.
"""
