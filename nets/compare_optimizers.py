"""python -m nets.compare_optimizers: the textbook's optimizer comparison on MNIST.

SGD(0.01), Momentum(0.01, 0.9), AdaGrad(0.01), RMSprop(0.01, 0.99) and Adam(0.001) each train
a MultiLayerNet 784-100-100-100-100-10 (relu, He init, the same initial weights) for 2,000
iterations of 128 samples, all on the SAME batches. Prints the batch loss every 100 iterations
and a markdown table of final losses; writes losses.json and, when matplotlib is installed,
losses.png (smoothed curves) into --out (default runs/optimizers-<timestamp>).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends import BackendError, get_backend
from nets.data import MnistDataError, atomic_file
from nets.markdown import markdown_table
from nets.networks import MultiLayerNet
from nets.optimizers import get_optimizer
from nets.progress import Progress
from nets.train import have_matplotlib, load_mnist_on, new_run_dir, skipped_chart_line, write_json

# label: (optimizer name, learning rate), the textbook's settings
BOOK_OPTIMIZERS: dict[str, tuple[str, float]] = {
    "SGD": ("sgd", 0.01),
    "Momentum": ("momentum", 0.01),
    "AdaGrad": ("adagrad", 0.01),
    "RMSprop": ("rmsprop", 0.01),
    "Adam": ("adam", 0.001),
}
HIDDEN = [100, 100, 100, 100]
LAST_N = 100


def smooth_curve(values: Any, window: int = 11, beta: float = 2.0) -> np.ndarray:
    """Kaiser-window moving average (the textbook's plot smoothing), reflected at the ends; same length."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < window:
        return x.copy()
    weights = np.kaiser(window, beta)
    return np.convolve(np.pad(x, window // 2, mode="reflect"), weights / weights.sum(), mode="valid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nets.compare_optimizers", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--iters", type=int, default=2000, help="iterations (default 2000)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per batch (default 128)")
    parser.add_argument("--backend", help="numpy, numba or cupy (default: $GRADGAP_BACKEND, else numpy)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches (default 0)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/optimizers-<timestamp>)")
    parser.add_argument("--data-dir", type=Path, help="MNIST directory (default: $GRADGAP_DATA_DIR, else a cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    return parser


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The final losses and test accuracy of each optimizer, as a markdown table."""
    header = ["optimizer", "lr", "final loss", "mean loss, last 100", "test acc"]
    rows = [
        [label, f"{r['lr']:g}", f"{r['final_loss']:.4f}", f"{r['mean_last_100']:.4f}", f"{r['test_acc']:.4f}"]
        for label, r in results.items()
    ]
    return markdown_table(header, rows)


def plot_losses(path: Path, results: dict[str, dict[str, Any]], iters: int) -> None:
    """Smoothed loss per iteration, one line per optimizer, markers every 100 iterations. Needs matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for (label, r), marker in zip(results.items(), "oxsvD", strict=True):
        ax.plot(np.arange(iters), smooth_curve(r["loss"]), marker=marker, markevery=100, label=label)
    ax.set(xlabel="iterations", ylabel="loss (smoothed)", ylim=(0, 1), title="optimizers on MNIST, same batches")
    ax.legend()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.batch_size < 1:
        print("error: --iters and --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        backend = get_backend(args.backend)
        (x_train, t_train), (x_test, t_test) = load_mnist_on(backend, "float64", args.data_dir)
    except (BackendError, MnistDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    nets = {
        label: MultiLayerNet(784, HIDDEN, 10, activation="relu", weight_init_std="he", seed=args.seed, backend=backend)
        for label in BOOK_OPTIMIZERS
    }
    optimizers = {label: get_optimizer(name, lr=lr) for label, (name, lr) in BOOK_OPTIMIZERS.items()}
    losses: dict[str, list[float]] = {label: [] for label in BOOK_OPTIMIZERS}
    rng = np.random.default_rng(args.seed)
    train_size = int(x_train.shape[0])
    progress = Progress(not args.no_progress, args.iters, f"5 optimizers on {backend.name}")
    started = time.perf_counter()
    for i in range(args.iters):
        batch_mask = backend.asarray(rng.choice(train_size, args.batch_size))  # one batch for every optimizer
        x_batch, t_batch = x_train[batch_mask], t_train[batch_mask]
        for label, net in nets.items():
            optimizers[label].update(net.params, net.gradient(x_batch, t_batch))
            losses[label].append(net.loss(x_batch, t_batch))
        if i % 100 == 0:
            progress.write(f"iteration {i}: " + ", ".join(f"{label} {v[-1]:.4f}" for label, v in losses.items()))
        progress.postfix(loss=f"{losses['Adam'][-1]:.4f}")
        progress.update()
    progress.close()
    backend.synchronize()
    wall = time.perf_counter() - started
    results = {
        label: {
            "optimizer": name,
            "lr": lr,
            "loss": losses[label],
            "final_loss": losses[label][-1],
            "mean_last_100": float(np.mean(losses[label][-LAST_N:])),
            "test_acc": nets[label].accuracy(x_test, t_test),
        }
        for label, (name, lr) in BOOK_OPTIMIZERS.items()
    }
    out_dir = args.out or new_run_dir(prefix="optimizers-")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "network": "MultiLayerNet(784, [100, 100, 100, 100], 10, relu, he)",
        "iters": args.iters,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "backend": backend.name,
    }
    write_json(out_dir / "losses.json", {"config": config, "wall_time_s": wall, "optimizers": results})
    written = ["losses.json"]
    if have_matplotlib():
        plot_losses(out_dir / "losses.png", results, args.iters)
        written.append("losses.png")
    print()
    print(results_table(results))
    print()
    if "losses.png" not in written:
        print(skipped_chart_line("losses.png"))
    print(
        f"{args.iters} iterations x 5 optimizers in {wall:.1f} s on {backend.name}; wrote {' and '.join(written)} "
        f"in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
