"""dymoe.calibration: measure expert importance, depth sensitivity and routing predictability on
sample text (``dymoe calibrate``), write ``calibration.json`` into the bundle and a report.

One concept per module: ``data`` (text -> token windows), ``stats`` (pure statistics),
``bank`` (expert sessions per precision), ``collect`` (the reference pass), ``inputs`` (each
expert's routed inputs, kept for GPTQ), ``sensitivity`` (one layer lowered), ``predict``
(look-ahead routing recall), ``schedule`` (retention r(l)), ``schema`` (calibration.json),
``priors`` (what the runtime reads), ``report`` (plots and Markdown), ``run`` (orchestration).
``options`` holds every default.
"""
