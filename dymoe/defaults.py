"""Defaults declared once, shared by the library API and the CLI (this module imports nothing
heavy, so the CLI can show them in --help without loading onnx)."""

PRECISIONS = ("fp16", "int8", "int4", "int2")  # export ladder; tests add fp32
BLOCK_SIZE = 32  # chosen by measurement, see README "Quantization"
# Data-free, and closer to fp32 than round-to-nearest on the demo model (README "Quantizers");
# gptq needs calibration inputs.
QUANTIZER = "hqq"
GPTQ_MIN_TOKENS = 64  # experts with fewer routed calibration tokens fall back to hqq
EXPORT_WORKERS = 1
MAX_NEW_TOKENS = 64
BUDGET = "100%"  # of every expert resident at the bundle's top precision
BENCH_POLICIES = "ondemand,lru,lru-prefetch,static-int4,dymoe"
BENCH_BUDGET = "25%"
BENCH_NEW_TOKENS = 32
DEMO_BUDGET = "10%"  # of the fp16 experts: small enough that LRU offloading thrashes
