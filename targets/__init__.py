"""dymoe.targets: what dymoe knows about deployment targets.

``storage/*.toml`` holds storage profiles (read bandwidth and per-request latency) that
``dymoe run --storage-profile NAME`` emulates, so a desktop can measure how a policy would
behave on a device's storage. ``device_profiles/*.toml`` holds device profiles (memory, versions, GPU,
provider options; ``devices.py``), ``providers.py`` decides which ONNX Runtime provider runs each
graph on ``--device cpu|cuda|tensorrt``, and ``rules.py`` judges which provider can run a graph.
"""
