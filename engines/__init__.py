"""quadit engines: the runtime that steps the diffusion sampler over PyTorch / ONNX Runtime backends."""
