"""Where one net.gradient() call (and the batched numerical gradient) spends its time on the GPU (issue 16).

    python -m bench.gpu_profile [--repeat 200] [--json results.json]

Seed setting: TwoLayerNet(784, 50, 10), sigmoid, seed 0, the first 100 MNIST training images
(synthetic data if MNIST cannot be found), float64. Each piece is timed by
cupyx.profiler.benchmark after warm-up calls: "CPU" is the host time of one call (Python, cupy's
launch overhead, the launches), "GPU" the time between CUDA events recorded before and after it on
the stream. A piece whose GPU time is about its CPU time waits on the device or is launch-bound; a
piece whose CPU time is far above its GPU time is host overhead. The first batched call is also
timed alone (wall clock, synchronized): it pays for kernel compilation and memory-pool growth.
Every piece runs in its own try/except, so one failure is reported and the rest still run.
Runs in well under a minute on an H200. Needs cupy and a CUDA device (prints why not otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import SEED_BATCH, SEED_SIZES, load_data


def _timed_piece(rows: list[dict], name: str, call: Callable[[], Any], repeat: int, warmup: int = 3, note: str = ""):
    """Time call() with cupyx.profiler.benchmark; append a row (medians and minima in microseconds)."""
    from cupyx.profiler import benchmark

    try:
        result = benchmark(call, n_repeat=repeat, n_warmup=warmup, max_duration=5.0, name=name)
        cpu, gpu = np.asarray(result.cpu_times) * 1e6, np.asarray(result.gpu_times)[0] * 1e6
        row = {"piece": name, "cpu_us": float(np.median(cpu)), "gpu_us": float(np.median(gpu))}
        row.update(cpu_min_us=float(cpu.min()), gpu_min_us=float(gpu.min()), n=int(cpu.size), note=note)
    except Exception as err:  # report and go on: one failure must not hide the rest
        row = {"piece": name, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
    rows.append(row)
    return row


def _switched(module: Any, settings: dict[str, Any], call: Callable[[], Any]) -> Callable[[], Any]:
    """call() with module constants temporarily set (e.g. _FUSED_BACKPROP = False)."""

    def run() -> Any:
        saved = {name: getattr(module, name) for name in settings}
        for name, value in settings.items():
            setattr(module, name, value)
        try:
            return call()
        finally:
            for name, value in saved.items():
                setattr(module, name, value)

    return run


def profile(repeat: int) -> tuple[list[dict], dict]:
    import cupy

    from backends import get_backend
    from kernels import xp_kernels
    from nets import TwoLayerNet

    be = get_backend("cupy")
    kernels = be.kernels
    backprop = kernels._backprop
    data = load_data(SEED_BATCH)
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    info = {
        "gpu": device["name"].decode() if isinstance(device["name"], bytes) else str(device["name"]),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "data": data.source,
        "fused_backprop": bool(kernels._FUSED_BACKPROP),
        "raw_cublas": bool(kernels._RAW_CUBLAS),
    }
    net = TwoLayerNet(*SEED_SIZES, seed=0, backend="cupy")
    x, t = data.on(be)
    weights, biases = [net.params["W1"], net.params["W2"]], [net.params["b1"], net.params["b2"]]
    act, alpha = net.activation, net.alpha
    rows: list[dict] = []
    net.gradient(x, t)  # validates x and t once (remembered), compiles the kernels
    be.synchronize()

    _timed_piece(rows, "validation: net._inputs(x, t), device arrays seen before", lambda: net._inputs(x, t), repeat)
    _timed_piece(rows, "validation: host numpy x, t (check + copy to device)", lambda: net._inputs(data.x, data.t), 50)
    _timed_piece(
        rows,
        "fused forward: 2 GEMMs + bias/activation kernel",
        lambda: backprop.forward(weights, biases, x, act, alpha, kernels._RAW_CUBLAS),
        repeat,
    )
    try:
        inputs, slopes, scores = backprop.forward(weights, biases, x, act, alpha, kernels._RAW_CUBLAS)
        scratch = scores.copy()  # the loss kernel works in place: same work on every repeat
        _timed_piece(
            rows,
            "fused loss: softmax + CE + dscores + db2 (1 kernel)",
            lambda: backprop.loss_and_dscores(scratch, biases[1], t),
            repeat,
        )
        _, db_last = backprop.loss_and_dscores(scores, biases[1], t)
        _timed_piece(
            rows,
            "fused backward: 3 GEMMs + scale/column-sum kernel",
            lambda: backprop.backward(weights, inputs, slopes, scores, db_last, kernels._RAW_CUBLAS),
            repeat,
        )
    except Exception as err:
        rows.append({"piece": "fused pieces", "error": f"{type(err).__name__}: {err}"})

    def whole() -> Any:
        return kernels.network_gradient(weights, biases, x, t, act, alpha)

    _timed_piece(rows, "kernels.network_gradient (fused, raw cuBLAS)", whole, repeat)
    _timed_piece(
        rows, "kernels.network_gradient (fused, cupy.matmul)", _switched(kernels, {"_RAW_CUBLAS": False}, whole), repeat
    )
    _timed_piece(
        rows,
        "kernels.network_gradient (generic, _FUSED_BACKPROP=False)",
        _switched(kernels, {"_FUSED_BACKPROP": False}, whole),
        repeat,
    )
    _timed_piece(
        rows, "net.gradient(x, t): whole call, float64 B=100", lambda: net.gradient(x, t), repeat, note="target 150 us"
    )
    _timed_piece(
        rows,
        "net.gradient, generic path",
        _switched(kernels, {"_FUSED_BACKPROP": False}, lambda: net.gradient(x, t)),
        repeat,
    )
    _timed_piece(rows, "net.loss(x, t) (forward + float(): one sync)", lambda: net.loss(x, t), repeat)
    try:
        net32 = TwoLayerNet(*SEED_SIZES, seed=0, backend="cupy", dtype="float32")
        x32, t32 = data.on(be, "float32")
        net32.gradient(x32, t32)
        _timed_piece(rows, "net.gradient float32 B=100", lambda: net32.gradient(x32, t32), repeat)
        big = np.random.default_rng(0)
        xb = be.asarray(np.tile(data.x, (100, 1)) * big.random((100 * SEED_BATCH, 1)))
        tb = be.asarray(np.tile(data.t, 100))
        net.gradient(xb, tb)
        _timed_piece(rows, "net.gradient float64 B=10000", lambda: net.gradient(xb, tb), min(repeat, 50))
    except Exception as err:
        rows.append({"piece": "float32 / B=10000 set-up", "error": f"{type(err).__name__}: {err}"})

    # batched numerical gradient: the first call alone, then warm calls, then what its GEMMs can do
    try:
        be.synchronize()
        start = time.perf_counter()
        net.numerical_gradient(x, t, method="batched")
        be.synchronize()
        rows.append({"piece": "batched: first call (wall, synced)", "cpu_us": (time.perf_counter() - start) * 1e6})
    except Exception as err:
        rows.append({"piece": "batched: first call", "error": f"{type(err).__name__}: {err}"})
    _timed_piece(
        rows,
        "batched: warm calls",
        lambda: net.numerical_gradient(x, t, method="batched"),
        3,
        warmup=1,
        note="target 50 ms",
    )
    _timed_piece(
        rows, "incremental: warm calls", lambda: net.numerical_gradient(x, t, method="incremental"), 20, warmup=2
    )
    try:
        x64 = x.astype(cupy.float64)
        active = cupy.flatnonzero((x64 != 0).any(axis=0))
        x_used = cupy.ascontiguousarray(x64[:, active])
        W1_used = cupy.ascontiguousarray(weights[0][active])
        w64 = [W1_used, weights[1]]
        chunk_bytes = kernels._chunk_bytes()
        chunk_args = (kernels._OPS, w64, biases, x_used, t, act, alpha, 0, "W", W1_used, 1e-4, chunk_bytes)

        def chunks() -> int:
            return sum(1 for _ in xp_kernels._batched_chunks(*chunk_args))

        n_chunks = chunks()
        _timed_piece(rows, f"batched: W1's {n_chunks} chunks alone ({W1_used.size} params)", chunks, 3, warmup=1)
        # the first GEMM of one W1 chunk: x_used (B, A) @ (A, S * 50), S perturbed sets (the generic chunk size rule)
        batch, n_active = x_used.shape
        per_set = 8 * (batch * (n_active + 3 * sum(W.shape[1] for W in w64)) + W1_used.size)
        sets = 2 * int(max(1, min(W1_used.size, chunk_bytes // (2 * per_set))))
        stacked = cupy.ones((n_active, sets * W1_used.shape[1]))
        row = _timed_piece(
            rows, f"batched: one chunk's x @ W1 GEMM ({sets} sets)", lambda: x_used @ stacked, 10, warmup=2
        )
        if "gpu_us" in row:
            flops = 2 * batch * n_active * stacked.shape[1]
            row["note"] = f"{flops / row['gpu_us'] / 1e6:.1f} TFLOP/s"
        info.update(active_inputs=int(n_active), batched_chunk_bytes=int(chunk_bytes), batched_sets_per_chunk=sets)
    except Exception as err:
        rows.append({"piece": "batched breakdown", "error": f"{type(err).__name__}: {err}"})
    return rows, info


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_table(rows: list[dict], info: dict) -> None:
    _say("  ".join(f"{key}={value}" for key, value in info.items()))
    _say(f"{'piece':<64} {'CPU med':>10} {'GPU med':>10} {'CPU min':>10} {'GPU min':>10}  (microseconds)")
    for row in rows:
        if "error" in row:
            _say(f"{row['piece']:<64} FAILED: {row['error']}")
            continue
        cells = [row.get(key) for key in ("cpu_us", "gpu_us", "cpu_min_us", "gpu_min_us")]
        text = " ".join(f"{c:>10.1f}" if c is not None else f"{'':>10}" for c in cells)
        _say(f"{row['piece']:<64} {text}  {row.get('note', '')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="timed calls per fast piece (default 200)")
    parser.add_argument("--json", help="also write the rows and machine info to this JSON file")
    args = parser.parse_args(argv)
    try:
        rows, info = profile(args.repeat)
    except Exception as err:  # no cupy, no device: say why
        _say(f"gpu_profile could not start: {type(err).__name__}: {err}")
        return 1
    print_table(rows, info)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"info": info, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
