"""python -m nets.train: the textbook's MNIST training run on any backend, with any gradient method.

Default (--preset seed000): TwoLayerNet 784-50-10 (sigmoid, weights 0.01 * N(0, 1)), SGD lr 0.1,
inputs pixel / 255, batches of 100 drawn with replacement, 10,000 iterations; after the update of
every 600th iteration (one epoch, iteration 0 included) it prints "train acc, test acc | a, b" on
the full train and test sets.

--preset mlp (seed 003): MultiLayerNet 784-200-200-10 (relu; kaiming-normal weights N(0, 2 / fan_in),
biases 0), inputs (pixel / 255 - 0.01307) / 0.3081 (the seed's own constants), SGD lr 0.01, batch
200, 10 epochs of 300 iterations, each epoch one fresh shuffle of the training set; the accuracies
are printed after each epoch.

Writes into --out (default runs/<timestamp>): curves.json (loss per iteration, accuracies per
epoch, wall time, config), curves.png (when matplotlib is installed) and checkpoint.npz (params,
optimizer state, RNG state, iteration, curves; written atomically). --resume CHECKPOINT continues
a run bit-identically. Ctrl-C saves a checkpoint and the curves so far, then exits with code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from backends import Backend, BackendError, get_backend
from kernels import ACTIVATIONS
from nets.data import MnistDataError, atomic_file, load_mnist
from nets.networks import NUMERICAL_METHODS, MultiLayerNet, TwoLayerNet
from nets.optimizers import OPTIMIZERS, get_optimizer
from nets.progress import Progress

GRADIENTS = ("backprop", *NUMERICAL_METHODS)
# How batches are drawn. with-replacement (seed 000): each batch rng.choice(N, B), accuracies after
# iterations 0, E, 2E, ... (E = N // B). shuffled-epochs (seed 003, a shuffling DataLoader): epoch e
# is one permutation of the training set cut into E batches, accuracies after each epoch's last batch.
SAMPLINGS = ("with-replacement", "shuffled-epochs")
CHECKPOINT_FORMAT = "gradgap-train-checkpoint-1"
# Options that define the experiment: a resumed run must keep them. --iters, --backend and
# --gradient may change on resume (they compute the same steps; bit-identity needs the same ones).
FIXED_ON_RESUME = ("preset", "hidden", "activation", "optimizer", "lr", "batch_size", "seed", "dtype")


@dataclasses.dataclass
class RunConfig:
    """Everything that determines a training run's numbers."""

    preset: str
    hidden: list[int]
    activation: str
    weight_init_std: float | str
    optimizer: str
    lr: float
    batch_size: int
    iters: int
    seed: int
    gradient: str
    backend: str
    dtype: str
    # Defaults: what every run did before these fields existed (older checkpoints resume unchanged).
    input_mean: float = 0.0  # inputs are (pixel / 255 - input_mean) / input_std
    input_std: float = 1.0
    sampling: str = "with-replacement"


PRESETS: dict[str, dict[str, Any]] = {
    "seed000": dict(
        hidden=[50], activation="sigmoid", weight_init_std=0.01, optimizer="sgd", lr=0.1, batch_size=100, iters=10_000
    ),
    # seed 003: torch.nn.init.kaiming_normal_ with its defaults (a=0, mode="fan_in", leaky_relu gain
    # sqrt(2)) draws N(0, 2 / fan_in), which is MultiLayerNet's "he" rule; torch.zeros biases.
    "mlp": dict(
        hidden=[200, 200],
        activation="relu",
        weight_init_std="he",
        optimizer="sgd",
        lr=0.01,
        batch_size=200,
        iters=3_000,
        input_mean=0.01307,
        input_std=0.3081,
        sampling="shuffled-epochs",
    ),
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the requested run."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _hidden_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"hidden sizes are comma-separated positive integers; got {text!r}") from err
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive; got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nets.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="seed000 (default) or mlp; sets the defaults below")
    parser.add_argument("--backend", help="numpy, numba or cupy (default: $GRADGAP_BACKEND, else numpy)")
    parser.add_argument("--gradient", choices=GRADIENTS, help="how gradients are computed (default: backprop)")
    parser.add_argument("--activation", choices=ACTIVATIONS)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default: sgd")
    parser.add_argument("--lr", type=float, help="learning rate (seed000: 0.1, mlp: 0.01)")
    parser.add_argument("--iters", type=_positive_int, help="iterations (seed000: 10000, mlp: 3000)")
    parser.add_argument("--batch-size", type=_positive_int, help="samples per batch (seed000: 100, mlp: 200)")
    parser.add_argument("--hidden", type=_hidden_sizes, help="hidden layer sizes, e.g. 50 or 200,200")
    parser.add_argument("--seed", type=int, help="seeds the weights and the batch sampling (default 0)")
    parser.add_argument("--dtype", choices=("float64", "float32"), help="the net's dtype (default float64)")
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default runs/<timestamp>, or the checkpoint's directory with --resume)",
    )
    parser.add_argument(
        "--checkpoint-every", type=_positive_int, metavar="N", help="also save a checkpoint every N iterations"
    )
    parser.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    parser.add_argument("--data-dir", type=Path, help="MNIST directory (default: $GRADGAP_DATA_DIR, else a cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset's settings, overridden by every option given."""
    preset = args.preset or "seed000"
    settings = {
        **PRESETS[preset],
        "preset": preset,
        "seed": 0,
        "gradient": "backprop",
        "dtype": "float64",
        "backend": get_backend(args.backend).name,
    }
    for field in dataclasses.fields(RunConfig):
        given = getattr(args, field.name, None)
        if given is not None and field.name not in ("preset", "backend"):
            settings[field.name] = given
    return RunConfig(**settings)


def new_run_dir(root: Path = Path("runs"), prefix: str = "") -> Path:
    """runs/<prefix><YYYYmmdd-HHMMSS>, with -2, -3... if that exists already; created."""
    stamp = prefix + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"too many runs named {root / stamp}-*")


def write_json(path: Path, data: Any) -> None:
    """data as indented JSON, written atomically."""
    with atomic_file(path, mode="w") as f:
        json.dump(data, f, indent=1)


def load_mnist_on(
    backend: Backend, dtype: str, data_dir: Path | None, input_mean: float = 0.0, input_std: float = 1.0
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """MNIST converted to the backend once: x (N, 784) (pixel / 255 - input_mean) / input_std in dtype,
    t (N,) int64 labels."""

    def normalized(x: np.ndarray) -> np.ndarray:
        if input_mean != 0.0:
            x -= x.dtype.type(input_mean)
        if input_std != 1.0:
            x /= x.dtype.type(input_std)
        return x

    (x_train, t_train), (x_test, t_test) = load_mnist(dtype=dtype, data_dir=data_dir)
    return (
        (backend.asarray(normalized(x_train)), backend.asarray(t_train)),
        (backend.asarray(normalized(x_test)), backend.asarray(t_test)),
    )


def have_matplotlib() -> bool:
    """Whether matplotlib imports (it is optional: without it the PNG charts are skipped)."""
    try:
        import matplotlib.figure  # noqa: F401  (a broken install fails here, before any work is lost)
    except ImportError:
        return False
    return True


def skipped_chart_line(name: str) -> str:
    """The one line a CLI prints when matplotlib is missing."""
    return f"matplotlib is not installed: skipped {name} (pip install matplotlib to get the chart)"


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (then raise KeyboardInterrupt): an update is never half-applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt


class Training:
    """One run: net, optimizer, RNG and curves, able to checkpoint and resume exactly."""

    def __init__(self, config: RunConfig, data_dir: Path | None) -> None:
        self.config = config
        self.backend = get_backend(config.backend)
        self.net = self._build_net()
        self.optimizer = get_optimizer(config.optimizer, lr=config.lr)
        if config.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {config.sampling!r}; valid: {', '.join(SAMPLINGS)}")
        (self.x_train, self.t_train), (self.x_test, self.t_test) = load_mnist_on(
            self.backend, config.dtype, data_dir, config.input_mean, config.input_std
        )
        self.train_size = int(self.x_train.shape[0])
        self.iter_per_epoch = max(self.train_size // config.batch_size, 1)
        self.rng = np.random.default_rng(config.seed)
        self._shuffled: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)
        self.iteration = 0
        self.curves: dict[str, Any] = {
            "loss": [],
            "epoch_iterations": [],
            "train_acc": [],
            "test_acc": [],
            "wall_time_s": 0.0,
        }

    def _build_net(self) -> TwoLayerNet | MultiLayerNet:
        return build_net(self.config, self.backend)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        """params, optimizer state, RNG state, iteration, curves and config as one .npz, written atomically."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(CHECKPOINT_FORMAT),
            "config": np.array(json.dumps(dataclasses.asdict(self.config))),
            "iteration": np.array(self.iteration, dtype=np.int64),
            "rng_state": np.array(json.dumps(self.rng.bit_generator.state)),
            "curves": np.array(json.dumps(self.curves)),
        }
        arrays.update({f"param/{k}": self.backend.to_numpy(p) for k, p in self.net.params.items()})
        arrays.update({f"optimizer/{k}": v for k, v in self.optimizer.state_dict().items()})
        with atomic_file(path) as f:
            np.savez(f, **arrays)

    def restore(self, saved: dict[str, np.ndarray]) -> None:
        """Put params, optimizer state, RNG state, iteration and curves back as saved."""
        for name, param in self.net.params.items():
            value = saved.get(f"param/{name}")
            if value is None or value.shape != tuple(param.shape):
                raise CheckpointError(f"checkpoint parameter {name} is missing or has the wrong shape")
            param[...] = self.backend.asarray(value)  # in place: the layers keep using these arrays
        prefix = "optimizer/"
        self.optimizer.load_state_dict({k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)})
        self.rng.bit_generator.state = json.loads(str(saved["rng_state"]))
        self.iteration = int(saved["iteration"])
        self.curves = json.loads(str(saved["curves"]))

    def write_outputs(self, out_dir: Path, status: str) -> list[str]:
        """curves.json and, when matplotlib is installed, curves.png in out_dir; returns the names written."""
        record = {
            "status": status,
            "iterations_done": self.iteration,
            "iter_per_epoch": self.iter_per_epoch,
            "config": dataclasses.asdict(self.config),
            **self.curves,
        }
        write_json(out_dir / "curves.json", record)
        if not have_matplotlib():
            return ["curves.json"]
        plot_curves(out_dir / "curves.png", record)
        return ["curves.json", "curves.png"]

    # -- the loop --------------------------------------------------------------------------------------------

    def _gradient(self, x_batch: Any, t_batch: Any) -> dict[str, Any]:
        if self.config.gradient == "backprop":
            return self.net.gradient(x_batch, t_batch)
        return self.net.numerical_gradient(x_batch, t_batch, method=self.config.gradient)

    def _batch_indices(self, i: int) -> np.ndarray:
        """The training-set rows of iteration i's batch (B,) int, as config.sampling says."""
        c = self.config
        if c.sampling == "with-replacement":
            return self.rng.choice(self.train_size, c.batch_size)
        epoch, position = divmod(i, self.iter_per_epoch)
        if self._shuffled is None or self._shuffled[0] != epoch:
            # one permutation per epoch, a function of (seed, epoch) only: a resumed run draws the same
            self._shuffled = (epoch, np.random.default_rng([c.seed, epoch]).permutation(self.train_size))
        return self._shuffled[1][position * c.batch_size : (position + 1) * c.batch_size]

    def _epoch_ends(self, i: int) -> bool:
        """Whether the accuracies are evaluated after the update of iteration i."""
        if self.config.sampling == "with-replacement":
            return i % self.iter_per_epoch == 0  # textbook: iterations 0, E, 2E, ...
        return (i + 1) % self.iter_per_epoch == 0  # after each whole epoch

    def _evaluate(self, i: int, progress: Progress) -> None:
        train_acc = self.net.accuracy(self.x_train, self.t_train)
        test_acc = self.net.accuracy(self.x_test, self.t_test)
        self.curves["epoch_iterations"].append(i)
        self.curves["train_acc"].append(train_acc)
        self.curves["test_acc"].append(test_acc)
        progress.write(f"train acc, test acc | {train_acc}, {test_acc}")

    def run(
        self,
        show_progress: bool,
        checkpoint_path: Path,
        checkpoint_every: int | None = None,
        on_iteration: Callable[[int], None] | None = None,
    ) -> None:
        """Iterate up to config.iters, saving to checkpoint_path every checkpoint_every iterations.

        KeyboardInterrupt leaves the state at the last whole iteration (an update is never half
        applied; the batch of an unfinished iteration is drawn again after a resume).
        """
        c = self.config
        progress = Progress(show_progress, c.iters, f"{c.gradient} on {self.backend.name}", initial=self.iteration)
        boundary_rng_state = self.rng.bit_generator.state
        started = time.perf_counter()
        try:
            for i in range(self.iteration, c.iters):
                batch_mask = self.backend.asarray(self._batch_indices(i))
                x_batch, t_batch = self.x_train[batch_mask], self.t_train[batch_mask]
                grads = self._gradient(x_batch, t_batch)
                if on_iteration is not None:
                    on_iteration(i)
                with sigint_deferred():
                    self.optimizer.update(self.net.params, grads)
                    loss = self.net.loss(x_batch, t_batch)
                    self.curves["loss"].append(loss)
                    if self._epoch_ends(i):
                        self._evaluate(i, progress)
                    self.iteration = i + 1
                    boundary_rng_state = self.rng.bit_generator.state
                    if checkpoint_every and self.iteration % checkpoint_every == 0:
                        self._add_wall_time(started)
                        started = time.perf_counter()
                        self.save_checkpoint(checkpoint_path)
                progress.postfix(loss=f"{loss:.4f}")
                progress.update()
        except KeyboardInterrupt:
            self.rng.bit_generator.state = boundary_rng_state  # the batch of the unfinished iteration is redrawn
            raise
        finally:
            progress.close()
            self._add_wall_time(started)

    def _add_wall_time(self, started: float) -> None:
        self.backend.synchronize()
        self.curves["wall_time_s"] += time.perf_counter() - started


def build_net(config: RunConfig, backend: Backend) -> TwoLayerNet | MultiLayerNet:
    """The run's net: a TwoLayerNet for preset seed000, else a MultiLayerNet (784, hidden, 10)."""
    common = dict(
        activation=config.activation,
        weight_init_std=config.weight_init_std,
        seed=config.seed,
        backend=backend,
        dtype=config.dtype,
    )
    if config.preset == "seed000":
        if len(config.hidden) != 1:
            raise ValueError(
                f"preset seed000 is a two-layer net with one hidden layer; got --hidden "
                f"{','.join(map(str, config.hidden))} (use --preset mlp for several)"
            )
        return TwoLayerNet(784, config.hidden[0], 10, **common)
    return MultiLayerNet(784, config.hidden, 10, **common)


def plot_curves(path: Path, record: dict[str, Any]) -> None:
    """curves.png: loss per iteration (left), train/test accuracy per epoch (right). Needs matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(len(record["loss"])), record["loss"], linewidth=0.6)
    loss_ax.set(xlabel="iteration", ylabel="loss (batch)", title="training loss")
    epochs = np.arange(len(record["train_acc"]))
    acc_ax.plot(epochs, record["train_acc"], marker="o", label="train acc")
    acc_ax.plot(epochs, record["test_acc"], marker="s", linestyle="--", label="test acc")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.0), title="accuracy")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.legend(loc="lower right")
    c = record["config"]
    fig.suptitle(f"{c['preset']}: {c['optimizer']} lr {c['lr']}, {c['gradient']} on {c['backend']}")
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            saved = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if str(saved.get("format", "")) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a gradgap training checkpoint")
    return saved


def resumed_config(saved: dict[str, np.ndarray], args: argparse.Namespace) -> RunConfig:
    """The checkpoint's config; --iters, --backend and --gradient may change it, other options must agree."""
    config = RunConfig(**json.loads(str(saved["config"])))
    conflicts = []
    for name in FIXED_ON_RESUME:
        given = getattr(args, name)
        if given is not None and given != getattr(config, name):
            conflicts.append(f"--{name.replace('_', '-')} {given} (the run used {getattr(config, name)})")
    if conflicts:
        raise CheckpointError("a resumed run keeps its settings; drop " + ", ".join(conflicts))
    if args.backend is not None:
        config.backend = get_backend(args.backend).name
    if args.gradient is not None:
        config.gradient = args.gradient
    if args.iters is not None:
        config.iters = args.iters
    done = int(saved["iteration"])
    if config.iters < done:
        raise CheckpointError(f"the checkpoint is at iteration {done}; --iters {config.iters} is already done")
    return config


def main(argv: list[str] | None = None, on_iteration: Callable[[int], None] | None = None) -> int:
    """Run the CLI; returns the exit code. on_iteration(i) is called after each gradient, before its update."""
    args = build_parser().parse_args(argv)
    try:
        if args.resume is not None:
            saved = read_checkpoint(args.resume)
            config = resumed_config(saved, args)
            training = Training(config, args.data_dir)
            training.restore(saved)
            print(f"resuming {args.resume} at iteration {training.iteration} of {config.iters}", file=sys.stderr)
            out_dir = args.out or args.resume.parent
        else:
            config = config_from_args(args)
            training = Training(config, args.data_dir)
            out_dir = args.out or new_run_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
    except (BackendError, MnistDataError, CheckpointError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    checkpoint = out_dir / "checkpoint.npz"
    try:
        training.run(not args.no_progress, checkpoint, args.checkpoint_every, on_iteration)
    except KeyboardInterrupt:
        training.save_checkpoint(checkpoint)
        if "curves.png" not in training.write_outputs(out_dir, "interrupted"):
            print(skipped_chart_line("curves.png"), file=sys.stderr)
        print(
            f"\ninterrupted at iteration {training.iteration} of {config.iters}; saved {checkpoint} and the curves "
            f"so far.\nresume with: python -m nets.train --resume {checkpoint}",
            file=sys.stderr,
        )
        return 130
    training.save_checkpoint(checkpoint)
    written = [*training.write_outputs(out_dir, "finished"), "checkpoint.npz"]
    if "curves.png" not in written:
        print(skipped_chart_line("curves.png"))
    wall = training.curves["wall_time_s"]
    done = len(training.curves["loss"])
    print(
        f"{done} iterations in {wall:.1f} s ({1000 * wall / max(done, 1):.3f} ms/iteration, {config.gradient} on "
        f"{training.backend.name}); wrote {', '.join(written[:-1])} and {written[-1]} in {out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
