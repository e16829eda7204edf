"""What a user sees: ft-ray's own lines on the terminal, everything else in a log file.

ft-ray writes through one logger, `ft_ray`, whose lines keep the `[ft-ray]` prefix
(warnings: `[ft-ray] warning: ...`). By default the command line (`quiet_session`) points
file descriptors 1 and 2 of the driver at a log file, so Ray's INFO lines, Ray Data's
progress bars, the lines Ray forwards from workers and libraries' warnings land there, and
only ft-ray's lines, progress displays and errors reach the terminal. `--verbose` (or
`FT_RAY_VERBOSE=1`) leaves both streams alone, as a library call does.

The log of a local run folder is `<run>/logs/<command>-<UTC time>.log`; for an object-store
run it is written to a local temp folder and copied to `<run>/logs/` when the command ends,
however it ends.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

LOG = logging.getLogger("ft_ray")
VERBOSE_ENV = "FT_RAY_VERBOSE"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"[ft-ray] error: {message}"
        if record.levelno >= logging.WARNING:
            return f"[ft-ray] warning: {message}"
        return f"[ft-ray] {message}"


class _Terminal:
    """Where ft-ray's own lines go: the process's stdout/stderr as they are at each write
    (so a test's capture sees them), or in a quiet session the saved terminal streams."""

    def __init__(self) -> None:
        self.out: IO[str] | None = None  # set in a quiet session
        self.err: IO[str] | None = None
        self.rich: Any = None  # rich.console.Console over `out` while a live display runs

    def stream(self, error: bool = False) -> IO[str]:
        if error:
            return self.err or sys.stderr
        return self.out or sys.stdout

    def is_tty(self) -> bool:
        try:
            return self.stream().isatty()
        except (AttributeError, ValueError):
            return False


TERMINAL = _Terminal()


class _TerminalHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if TERMINAL.rich is not None and record.levelno < logging.ERROR:
                TERMINAL.rich.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                stream = TERMINAL.stream(error=record.levelno >= logging.ERROR)
                stream.write(line + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _install() -> None:
    if any(isinstance(h, _TerminalHandler) for h in LOG.handlers):
        return
    handler = _TerminalHandler()
    handler.setFormatter(_Formatter())
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


_install()


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet() -> bool:
    """True inside a quiet session (the driver's progress displays stand in for the workers' lines)."""
    return TERMINAL.out is not None


@contextmanager
def quiet_session(log_file: Path, copy_to: Any = None, process_ends: bool = False) -> Iterator[Path]:
    """Send the process's fd 1 and 2 (Ray, libraries, forwarded worker output) to `log_file`;
    ft-ray's logger keeps writing to the terminal. Names the log in one line at the start.
    Gives `copy_to` (a RunFolder) the log under `logs/` at the end. `process_ends` (a
    command line about to exit): Ray is shut down inside the session and fd 1 and 2 stay on
    the log, so Ray's last output (its log monitor, its exit handlers) lands there too."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    TERMINAL.out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    TERMINAL.err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    file_handler = logging.FileHandler(log_file, encoding="utf-8")  # ft-ray's lines in the log too, in order
    file_handler.setFormatter(logging.Formatter("%(asctime)s ft_ray %(levelname)s %(message)s"))
    LOG.addHandler(file_handler)
    where = f"{log_file}" + (f" (copied to {copy_to.uri_of('logs/' + log_file.name)} at the end)" if copy_to else "")
    LOG.info(f"log: {where} (Ray, workers, libraries; --verbose shows it here)")
    try:
        yield log_file
    finally:
        if process_ends and "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        LOG.removeHandler(file_handler)
        file_handler.close()
        if not process_ends:
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            for stream in (TERMINAL.out, TERMINAL.err):
                stream.close()
            TERMINAL.out = TERMINAL.err = None
        os.close(saved_out)
        os.close(saved_err)
        if copy_to is not None:
            try:
                copy_to.write_text(f"logs/{log_file.name}", log_file.read_text(encoding="utf-8", errors="replace"))
            except Exception as e:  # noqa: BLE001 - the local log stays; say where
                LOG.warning(f"could not copy the log to {copy_to.uri}: {e}; it stays at {log_file}")


def log_file_for(folder: Any, command: str) -> tuple[Path, Any]:
    """(local log path, RunFolder to copy it to or None) for a command working in `folder`."""
    name = f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    if folder.is_local:
        return Path(folder.local_path("logs")) / name, None
    return Path(tempfile.gettempdir()) / "ft-ray-logs" / folder.root.replace("/", "_") / name, folder


# ---------------------------------------------------------------- errors


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def root_cause(error: BaseException) -> tuple[str, str | None]:
    """The first exception of a chain (through Ray's wrappers and `raise ... from`), as
    `Type: message`, and where it was raised: `file:line` of the deepest frame, plus the
    deepest ft-ray frame when that is another (`.../modeling_utils.py:4579, from
    .../ft_ray/train/modeling.py:27`), or None when no frame is known.

    An exception from a Ray worker arrives without its traceback; Ray puts the worker's
    traceback in the text of its wrapper, where the frames are read from."""
    chain, seen = [error], {id(error)}
    while (inner := _inner(chain[-1])) is not None and id(inner) not in seen:
        seen.add(id(inner))
        chain.append(inner)
    first = chain[-1]
    message = str(first).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in message:  # a traceback as text
        cause = lines[-1]
    else:
        cause = f"{type(first).__name__}: {message}" if message else type(first).__name__
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(first.__traceback__)] if first.__traceback__ else []
    for wrapper in reversed(chain):  # else the innermost traceback text in the chain
        if frames:
            break
        frames = [(name, int(line)) for name, line in _FRAME.findall(str(wrapper))]
    if not frames:
        return cause, None
    where = f"{frames[-1][0]}:{frames[-1][1]}"
    ours = [frame for frame in frames if f"{os.sep}ft_ray{os.sep}" in frame[0]]
    if ours and ours[-1] != frames[-1]:
        where += f", from {ours[-1][0]}:{ours[-1][1]}"
    return cause, where


def _inner(error: BaseException) -> BaseException | None:
    failures = getattr(error, "worker_failures", None)  # Ray Train: {rank: exception}
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    # Ray Train's controller failure; the user's exception inside Ray's RayTaskError
    for name in ("controller_failure", "cause"):
        inner = getattr(error, name, None)
        if isinstance(inner, BaseException):
            return inner
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def report_failure(error: BaseException, log_file: Path | None) -> None:
    """The root cause on the terminal (and the whole traceback in the log, when there is one)."""
    cause, where = root_cause(error)
    if log_file is not None:
        with open(log_file, "a", encoding="utf-8") as log:
            traceback.print_exception(error, file=log)
    LOG.error(cause + (f" (at {where})" if where else ""))
    if log_file is not None:
        LOG.error(f"the full log: {log_file}")
