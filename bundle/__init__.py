"""The bundle contract, the bottom layer of dymoe: what a bundle is on disk and the rules for
touching it. Manifest and calibration.json schemas, file names, the precision table, ONNX graph
I/O names, the strict readers, path confinement, atomic writes, the writer lock and journals,
errors. Imports nothing from the rest of dymoe and no heavy package (no onnx, no onnxruntime).
"""
