"""Live progress of a phase on the driver: a bar in a terminal (rich), plain lines elsewhere.

In a terminal a phase shows one live display (done/total, rate, its own figures, an ETA).
Anywhere else (a pipe, a file, CI, `ray job logs`) it writes a plain line when another 10%
is done (at most one line per 2 s) or 30 s have passed, and one at the end; never an escape
code or a carriage return.

Work done in Ray tasks and workers reaches the driver through a `Board`, a small actor the
driver creates: tokenizing tasks add the records they read, rank 0 of a run puts each
metrics line. Outside a quiet session (`console.quiet()`) there is no board and the
workers' own lines are the progress, as before.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ft_ray.console import LOG, TERMINAL, quiet

PLAIN_EVERY_S = 30.0
PLAIN_EVERY_FRACTION = 0.1
PLAIN_MIN_GAP_S = 2.0  # work that finishes in a burst gets one line, not one per 10%
POLL_S = 0.5


class Display:
    """One phase's progress. `update(done, figures)`; `close()` writes the last state."""

    def __init__(self, label: str, total: int | None, unit: str, live: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.live = TERMINAL.is_tty() if live is None else live
        self.started = time.monotonic()
        self.done, self.figures = 0, ""
        self._last_line_at, self._last_line_done = self.started, 0
        self._last_line_state: tuple[int, str] = (0, "")
        self._progress = self._task = None
        if self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            TERMINAL.rich = Console(file=TERMINAL.stream(), force_terminal=True, highlight=False)
            columns = [SpinnerColumn(), TextColumn("[ft-ray] {task.description}", markup=False)]
            columns += ([BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()] if total
                        else [TextColumn("{task.completed:.0f} " + unit), _rate_column(unit), TimeElapsedColumn()])
            columns.append(TextColumn("{task.fields[figures]}", markup=False))
            # not rich's stdout/stderr redirection: what Ray prints must go on to the log
            self._progress = Progress(*columns, console=TERMINAL.rich, transient=False, redirect_stdout=False,
                                      redirect_stderr=False)
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, figures="")

    def update(self, done: int, figures: str = "") -> None:
        self.done, self.figures = done, figures
        if self._progress is not None:
            self._progress.update(self._task, completed=done, figures=figures)
            return
        now = time.monotonic()
        step = max(1, int(self.total * PLAIN_EVERY_FRACTION)) if self.total else None
        since = now - self._last_line_at
        if (step and done - self._last_line_done >= step and since >= PLAIN_MIN_GAP_S) or since >= PLAIN_EVERY_S:
            self._plain_line()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            TERMINAL.rich = None
        elif (self.done, self.figures) != self._last_line_state:
            self._plain_line()

    def _plain_line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        parts = [f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if not self.total and elapsed > 0:
            parts.append(f"{self.done / elapsed:.0f} {self.unit}/s")
        if self.figures:
            parts.append(self.figures)
        parts.append(f"{elapsed:.0f} s")
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {elapsed / self.done * (self.total - self.done):.0f} s")
        LOG.info("  ".join(parts))
        self._last_line_at, self._last_line_done = now, self.done
        self._last_line_state = (self.done, self.figures)


def _rate_column(unit: str) -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed or 0
            return Text(f"{task.completed / elapsed:.0f} {unit}/s" if elapsed > 0 else "")

    return Rate()


def _board_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        """Counters and the latest record of each kind, for the driver to poll."""

        def __init__(self) -> None:
            self.counts: dict[str, int] = {}
            self.latest: dict[str, dict] = {}

        def add(self, key: str, n: int) -> None:
            self.counts[key] = self.counts.get(key, 0) + n

        def put(self, key: str, record: dict) -> None:
            self.latest[key] = {**self.latest.get(key, {}), **record}

        def read(self) -> tuple[dict[str, int], dict[str, dict]]:
            return self.counts, self.latest

    return Board


_BOARD: Any = None


def board() -> Any:
    """The driver's board (created on first use), or None outside a quiet session."""
    global _BOARD
    if not quiet():
        return None
    if _BOARD is None:
        _BOARD = _board_class().remote()
    return _BOARD


@contextmanager
def watching(label: str, total: int | None, unit: str,
             render: Callable[[dict[str, int], dict[str, dict]], tuple[int, str]]) -> Iterator[Any]:
    """Show a display fed from the board while the body runs (blocking calls such as
    `trainer.fit()`). `render(counts, latest)` gives (done, figures). Yields the board, or
    None (and shows nothing) outside a quiet session."""
    import ray

    handle = board()
    if handle is None:
        yield None
        return
    display = Display(label, total, unit)
    stop = threading.Event()
    before = ray.get(handle.read.remote())[0]  # counters are the session's: show this phase's

    def show() -> None:
        counts, latest = ray.get(handle.read.remote(), timeout=10)
        display.update(*render({k: v - before.get(k, 0) for k, v in counts.items()}, latest))

    def poll() -> None:
        while True:
            try:
                show()
            except Exception:  # noqa: BLE001 - a missed poll only delays the display
                pass
            if stop.wait(POLL_S):
                return

    thread = threading.Thread(target=poll, daemon=True, name="ft-ray-progress")
    thread.start()
    try:
        yield handle
    finally:
        stop.set()
        thread.join(timeout=15)
        try:
            show()
        except Exception:  # noqa: BLE001 - the display ends with what it last had
            pass
        display.close()
