"""The gradgap benchmark suite (pytest-benchmark) and its report (``python -m bench.report``).

Groups: gap (the seed setting: naive, batched and incremental numerical gradients against
backprop, per backend), kernels, scaling and peers (the textbook implementation, torch).
``pytest bench --gap-profile=quick|full``; every benchmark checks its result first.
"""
