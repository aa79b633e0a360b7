"""dymoe.targets: what dymoe knows about deployment targets.

``storage/*.toml`` holds storage profiles (read bandwidth and per-request latency) that
``dymoe run --storage-profile NAME`` emulates, so a desktop can measure how a policy would
behave on a device's storage.
"""
