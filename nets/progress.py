"""The one progress helper: a tqdm bar on stderr, or nothing at all when disabled.

Used by the numerical gradients (``progress=True``), MNIST downloads, the training CLIs and the
benchmark report's phase bars. Lines written through the bar (``Progress.write``) go to stdout
above it, so a CLI's output stays readable and pipeable while the bar and its ETA live on stderr
(or on the stream given).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any


class Progress:
    """A tqdm bar over ``total`` units (``enabled=False``: every method is a no-op, tqdm is not imported).

    Usable as a context manager (closes the bar on exit) or with an explicit ``close()``.
    ``callback`` is ``update`` when enabled, else None, for APIs that take an optional callback.
    stream: where the bar is drawn (default stderr); bar_format: tqdm's, for a fixed layout.
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        unit_scale: bool = False,
        initial: int = 0,
        stream: IO[str] | None = None,
        bar_format: str | None = None,
    ) -> None:
        self._bar: Any = None
        self.total = total
        self.done = initial
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError as err:  # a base dependency: only a broken install gets here
                raise ImportError("a progress bar needs tqdm: pip install tqdm") from err
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                file=stream or sys.stderr,
                dynamic_ncols=True,
                bar_format=bar_format,
            )

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    @property
    def callback(self) -> Callable[[int], None] | None:
        """``update`` for a live bar, None when disabled (callers then skip the call entirely)."""
        return self.update if self._bar is not None else None

    def update(self, n: int = 1) -> None:
        """Advance the bar by n units (``done`` counts them, bar or not)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    @property
    def finished(self) -> bool:
        """Whether ``total`` units are done."""
        return self.done >= self.total

    def postfix(self, text: str = "", **values: Any) -> None:
        """Show text, or key=value pairs, after the bar (e.g. the current loss); redrawn with the next update."""
        if self._bar is not None:
            if values:
                self._bar.set_postfix(values, refresh=False)
            else:
                self._bar.set_postfix_str(text, refresh=False)

    def write(self, text: str) -> None:
        """One line on stdout, above the bar when there is one."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
