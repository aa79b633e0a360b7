"""dymoe: run Mixture-of-Experts language models on devices whose memory cannot hold them.

The package is split by role: ``dymoe.toolchain`` (export checkpoints to bundles),
``dymoe.runtime`` (generate from a bundle), ``dymoe.calibration`` and ``dymoe.targets``.
``dymoe.manifest`` is the single contract between export and run.
"""

__version__ = "0.1.0"
