"""dymoe.runtime: generate text from a bundle with ONNX Runtime (no torch)."""
