"""dymoe: run Mixture-of-Experts language models on devices whose memory cannot hold them.

The layers, bottom up (none imports a layer above it, nor a sibling):

* ``dymoe.bundle`` (``bundle/``): the bundle contract - manifest and calibration.json schemas,
  file names, the precision table, graph I/O names, path confinement, atomic writes, locks.
* ``dymoe.toolchain`` (export and requantize), ``dymoe.runtime`` (generate, policies, bench,
  eval) and ``dymoe.targets`` (device profiles), each on the contract alone.
* ``dymoe.calibration``: measures a bundle by running it with the runtime.
* ``dymoe`` itself (``dymoe/``): the CLI, the demo and pipelines that span packages (the gptq export).
"""

from dymoe.bundle.version import __version__

__all__ = ["__version__"]
