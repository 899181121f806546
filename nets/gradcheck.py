"""python -m nets.gradcheck: the textbook's gradient check on a few MNIST images, entry by entry.

A TwoLayerNet 784-H-10 (H = --hidden, default 50) computes its gradient on x_train[:N] (N = --batch,
default 3; one-hot labels) by backpropagation and by the numerical gradient (--method), and prints
"name: mean |backprop - numerical|" for each parameter (seed 001's lines), then a table per
parameter, the worst entries with their verdicts (agrees / kink / mismatch against the finite
difference's own error bound) and what the check cost. Exit code 0 when backprop agrees (kinks
are not failures), 1 when some entry mismatches (or, with --tolerance, a mean exceeds it), 2 for
bad input (arguments, an activation that cannot be loaded, missing data or backend).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from backends import BackendError, get_backend
from kernels import ACTIVATIONS
from kernels.activations import Activation, activation_name
from nets.data import MnistDataError, load_mnist
from nets.gradient import SAFETY, gradient_check
from nets.networks import NUMERICAL_METHODS, TwoLayerNet


class InputError(Exception):
    """Bad input from the command line: exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nets.gradcheck",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", help="numpy, numba or cupy (default: $GRADGAP_BACKEND, else numpy)")
    parser.add_argument(
        "--method", choices=NUMERICAL_METHODS, default="naive", help="numerical gradient method (default naive)"
    )
    parser.add_argument("--batch", type=int, default=3, help="number of training images (default 3)")
    parser.add_argument("--hidden", type=int, default=50, help="hidden units (default 50, the textbook's net)")
    parser.add_argument(
        "--activation",
        default="relu",
        help=f"hidden activation: {', '.join(ACTIVATIONS)} (default relu, the backprop chapter's net), "
        "or module:object naming a kernels.activations.Activation",
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the net's dtype")
    parser.add_argument("--h", type=float, default=1e-4, help="finite-difference step (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--safety", type=float, default=SAFETY, help=f"mismatch above this many error bounds (default {SAFETY:g})"
    )
    parser.add_argument("--worst", type=int, default=5, help="worst entries listed per parameter (default 5)")
    parser.add_argument(
        "--tolerance", type=float, help="also fail when a mean |backprop - numerical| exceeds this (off by default)"
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--data-dir", type=Path, help="MNIST directory (default: $GRADGAP_DATA_DIR, else a cache)")
    return parser


def load_activation(spec: str) -> str | Activation:
    """A built-in activation name, or the Activation that ``module:object`` names (object may be dotted)."""
    if spec in ACTIVATIONS:
        return spec
    if ":" not in spec:
        raise InputError(f"unknown activation {spec!r}; valid: {', '.join(ACTIVATIONS)}, or module:object")
    module_name, _, object_path = spec.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for attribute in object_path.split("."):
            found = getattr(found, attribute)
    except Exception as err:  # any failure to import or find it is the user's input
        raise InputError(f"cannot load activation {spec!r}: {type(err).__name__}: {err}") from err
    if not isinstance(found, Activation):
        raise InputError(f"activation {spec!r} is a {type(found).__name__}, not a kernels.activations.Activation")
    return found


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN/Infinity: such floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_or_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 1 <= args.batch <= 60000:
            raise InputError(f"--batch must be in [1, 60000]; got {args.batch}")
        if args.hidden < 1:
            raise InputError(f"--hidden must be >= 1; got {args.hidden}")
        if not (math.isfinite(args.h) and args.h > 0):
            raise InputError(f"--h must be a positive finite number; got {args.h}")
        if not (math.isfinite(args.safety) and args.safety > 0):
            raise InputError(f"--safety must be a positive finite number; got {args.safety}")
        if args.worst < 0:
            raise InputError(f"--worst must be >= 0; got {args.worst}")
        activation = load_activation(args.activation)
        backend = get_backend(args.backend)
        (x_train, t_train), _ = load_mnist(one_hot_label=True, dtype=args.dtype, data_dir=args.data_dir)
        net = TwoLayerNet(
            784, args.hidden, 10, activation=activation, seed=args.seed, backend=backend, dtype=args.dtype
        )
    except (InputError, BackendError, MnistDataError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    x_batch, t_batch = backend.asarray(x_train[: args.batch]), backend.asarray(t_train[: args.batch])
    report = gradient_check(net, x_batch, t_batch, method=args.method, h=args.h, worst=args.worst, safety=args.safety)
    print(report.format(worst=args.worst))
    print(
        f"({args.method} numerical gradient vs backprop, {net.n_params} parameters, batch {args.batch}, "
        f"{activation_name(activation)}, {backend.name}, {report.cost.total_s:.2f} s)"
    )
    if args.json is not None:
        document = report.to_dict() | {
            "net": {"sizes": net.sizes, "activation": activation_name(activation), "dtype": args.dtype},
            "batch": args.batch,
            "tolerance": args.tolerance,
        }
        args.json.write_text(json.dumps(_finite_or_text(document), indent=2) + "\n")
    failed = False
    mismatches = report.mismatches()
    if mismatches:
        where = ", ".join(f"{name} {len(indices)}" for name, indices in mismatches.items())
        print(
            f"FAIL: {sum(map(len, mismatches.values()))} entries mismatch ({where}): backprop disagrees with the "
            f"numerical gradient by more than {args.safety:g}x the finite difference's own error bound",
            file=sys.stderr,
        )
        failed = True
    if args.tolerance is not None:
        too_large = {name: diff for name, diff in report.items() if not diff <= args.tolerance}
        if too_large:
            names = ", ".join(f"{name} {diff:.2e}" for name, diff in too_large.items())
            print(
                f"FAIL: {names} above the tolerance {args.tolerance:g} (mean |backprop - numerical|)", file=sys.stderr
            )
            failed = True
        else:
            print(f"OK: every mean difference <= {args.tolerance:g}")
    if failed:
        return 1
    kinks = report.counts["kink"]
    print(f"OK: backprop agrees{f' ({kinks} entries at a kink, not failures)' if kinks else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
