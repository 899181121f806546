"""Adam on Himmelblau's function with the textbook numerical gradient (seed 003's 2-D example).

f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2 has four minima, all with f = 0; from (0, 0) Adam
(lr 1e-3) walks to the one at (3, 2). The gradient is nets.gradient.numerical_gradient: central
differences, no backprop. Run from the repository root:

    python -m examples.himmelblau [--steps N] [--lr LR] [--print-every N]
"""

from __future__ import annotations

import argparse

import numpy as np

from nets.gradient import numerical_gradient
from nets.optimizers import Adam


def himmelblau(p: np.ndarray) -> float:
    """f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2 for p = (x, y)."""
    x, y = p
    return float((x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2)


def main(
    steps: int = 20_000,
    lr: float = 1e-3,
    print_every: int = 2_000,
    start: tuple[float, float] = (0.0, 0.0),
    verbose: bool = True,
) -> np.ndarray:
    """Adam from ``start``; returns the final point (2,) float64."""
    point = np.array(start, dtype=np.float64)
    params = {"xy": point}
    optimizer = Adam(lr=lr)
    for step in range(steps):
        optimizer.update(params, {"xy": numerical_gradient(himmelblau, point)})
        if verbose and (step % print_every == 0 or step == steps - 1):
            print(f"step {step}: x = {point.tolist()}, f(x) = {himmelblau(point):.6g}")
    return point


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--print-every", type=int, default=2_000)
    args = parser.parse_args()
    final = main(args.steps, args.lr, max(args.print_every, 1))
    print(f"final point {final.tolist()}, distance to (3, 2): {np.hypot(final[0] - 3, final[1] - 2):.2e}")
