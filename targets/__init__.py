"""dymoe.targets: what dymoe knows about deployment targets (device storage profiles,
TensorRT engine builds). Empty in this release."""
