"""python -m nets.gradcheck: the textbook's gradient check on a few MNIST images.

A TwoLayerNet 784-50-10 computes its gradient on x_train[:N] (N = --batch, default 3; one-hot
labels) by backpropagation and by the numerical gradient (--method), and prints
"name: mean |backprop - numerical|" for each parameter. Exit code 1 when any value exceeds
--tolerance (default 1e-7): backpropagation and the numerical gradient then disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from backends import BackendError, get_backend
from kernels import ACTIVATIONS
from nets.data import MnistDataError, load_mnist
from nets.gradient import gradient_check
from nets.networks import NUMERICAL_METHODS, TwoLayerNet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nets.gradcheck", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--backend", help="numpy, numba or cupy (default: $GRADGAP_BACKEND, else numpy)")
    parser.add_argument(
        "--method", choices=NUMERICAL_METHODS, default="naive", help="numerical gradient method (default naive)"
    )
    parser.add_argument("--batch", type=int, default=3, help="number of training images (default 3)")
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="hidden activation (default relu, the backprop chapter's net)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--tolerance", type=float, default=1e-7, help="largest acceptable mean difference")
    parser.add_argument("--data-dir", type=Path, help="MNIST directory (default: $GRADGAP_DATA_DIR, else a cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.batch <= 60000:
        print(f"error: --batch must be in [1, 60000]; got {args.batch}", file=sys.stderr)
        return 2
    try:
        backend = get_backend(args.backend)
        (x_train, t_train), _ = load_mnist(one_hot_label=True, dtype="float64", data_dir=args.data_dir)
    except (BackendError, MnistDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    net = TwoLayerNet(784, 50, 10, activation=args.activation, seed=args.seed, backend=backend)
    x_batch, t_batch = backend.asarray(x_train[: args.batch]), backend.asarray(t_train[: args.batch])
    started = time.perf_counter()
    diffs = gradient_check(net, x_batch, t_batch, method=args.method)
    backend.synchronize()
    elapsed = time.perf_counter() - started
    for name, diff in diffs.items():
        print(f"{name}: {diff:.6e}")
    print(
        f"({args.method} numerical gradient vs backprop, {net.n_params} parameters, batch {args.batch}, "
        f"{backend.name}, {elapsed:.2f} s)"
    )
    too_large = {name: diff for name, diff in diffs.items() if not diff <= args.tolerance}
    if too_large:
        names = ", ".join(f"{name} {diff:.2e}" for name, diff in too_large.items())
        print(
            f"FAIL: {names} above the tolerance {args.tolerance:g}: backprop and the numerical gradient disagree",
            file=sys.stderr,
        )
        return 1
    print(f"OK: every mean difference <= {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
