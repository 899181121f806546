"""The gradgap benchmark suite (pytest-benchmark) and its report (``python -m bench.report``).

Groups: gap (the seed setting: naive, batched, incremental and series numerical gradients against
backprop, per backend), deep (MultiLayerNet(784, [100] * 4, 10)), kernels, scaling, peers (the
textbook implementation, torch), dgemm (the machine's matmul rate, for the roofline) and
distributed. ``pytest bench --gap-profile=quick|standard|full`` (bench.common.PROFILES); every
benchmark checks its result. bench/plugin.py is the pytest plugin tests/ and bench/ share.
"""
