"""The version of dymoe that writes a bundle (recorded in manifest.json and calibration.json)."""

__version__ = "0.1.0"
