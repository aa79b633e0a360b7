"""dymoe.calibration: measure expert importance, depth sensitivity and predictability on
sample text (``dymoe calibrate``; not part of this release yet)."""
