"""Run, bench and eval defaults, declared once (the CLI shows them in --help; imports nothing heavy)."""

MAX_NEW_TOKENS = 64
BUDGET = "100%"  # of every expert resident at the bundle's top precision
IO = "cached"  # or "direct": every expert load reads storage, not the page cache
# an all-resident step's experts run on this many threads (at most the CPU count): 1.57x on the experts
# of a Qwen3-30B-A3B-shaped decode step on 2 cores (benchmarks/decode_profile.py)
EXPERT_THREADS = 2
ENGINE_CACHE = "auto"  # ORT-optimised expert graphs in the user cache
BENCH_POLICIES = "ondemand,lru,lru-prefetch,static-int4,dymoe"
BENCH_BUDGET = "25%"
BENCH_NEW_TOKENS = 32
BENCH_REPEATS = 3
WINDOW = 128  # perplexity window (tokens)
TRT_OPTIMIZATION_LEVEL = 3  # dymoe build-engines: TensorRT's own default; good engines, builds in seconds per expert
