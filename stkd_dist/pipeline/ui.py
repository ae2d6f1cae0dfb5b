"""What the pipeline shows while it runs: stage headers, status lines, progress bars, summaries.

On a terminal, long stages show a rich spinner or progress bar; elsewhere (logs, CI, tests) they
print a plain line now and then instead. Every line also goes to the run's log file through the
``stkd.pipeline`` logger.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stkd_dist.location import (
    Location,
    as_path,
    exists,
    is_remote,
    location,
    makedirs,
    read_bytes,
    scratch_dir,
    write_bytes_atomic,
)

log = logging.getLogger("stkd.pipeline")
# the console already shows these lines; they go to the run's log file only (see run_log)
log.propagate = False


@dataclass(frozen=True)
class StageReport:
    """How a stage went in this invocation.

    Attributes:
        name: the stage.
        status: ``ran``, ``skipped`` (done before, outputs present) or ``reused`` (the dataset
            existed).
        seconds: time it took now (skipped: what it took when it ran).
        detail: one line about its result.
    """

    name: str
    status: str
    seconds: float
    detail: str = ""


class PipelineUI:
    """Console output of a pipeline run.

    Args:
        console: where to print (default: stdout).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    @property
    def live(self) -> bool:
        """Whether spinners and bars are drawn (a terminal), rather than plain lines."""
        return self.console.is_terminal

    def echo(self, text: str) -> None:
        """A status line."""
        self.console.print(text, soft_wrap=True, markup=False, highlight=False)
        log.info(text)

    def stage(self, index: int, total: int, name: str, note: str = "") -> None:
        """The header of a stage."""
        self.console.rule(f"[{index}/{total}] {name}" + (f" ({note})" if note else ""))
        log.info("stage %d/%d %s %s", index, total, name, note)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner while a block without measurable progress runs (training prints its own
        epoch lines above it)."""
        log.info(text)
        if not self.live:
            self.console.print(text, soft_wrap=True, markup=False, highlight=False)
            yield
            return
        with self.console.status(text):
            yield

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[ProgressHandle]:
        """A progress bar; the handle's ``start(total)`` sets the total, ``advance(n)`` moves it."""
        handle = ProgressHandle(self, description, total)
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True, disable=not self.live) as bar:
            handle.attach(bar, bar.add_task(description, total=total))
            yield handle
        handle.finish()

    @contextlib.contextmanager
    def training(self, experiment: Location, what: str, epochs: int) -> Iterator[None]:
        """A bar of the epochs of a Ray Train run, with one line per epoch.

        The epoch lines come from the experiment's ``history.jsonl`` (appended by the Ray Train
        controller after every epoch), polled from a thread: they show even when the workers'
        own output is not forwarded to this process.
        """
        with self.progress(f"{what} (epochs)", total=epochs) as bar:
            watcher = _HistoryWatcher(location(experiment), epochs, self, bar)
            watcher.start()
            try:
                yield
            finally:
                watcher.stop()

    def stage_table(self, reports: Sequence[StageReport]) -> None:
        """The stages of this invocation: ran or skipped, how long."""
        table = Table(title="stages")
        for col in ("stage", "status", "seconds", "result"):
            table.add_column(col, justify="right" if col == "seconds" else "left")
        for r in reports:
            table.add_row(r.name, r.status, f"{r.seconds:.1f}", r.detail)
        self.console.print(table)
        for r in reports:
            log.info("stage %s: %s in %.1f s %s", r.name, r.status, r.seconds, r.detail)

    def metrics_table(self, title: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """The summary of models and baselines (one row each)."""
        if not rows:
            return
        table = Table(title=title)
        cols = list(rows[0])
        for col in cols:
            table.add_column(col, justify="left" if col == "model" else "right")
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in cols))
        self.console.print(table)


class LinesUI(PipelineUI):
    """A :class:`PipelineUI` that keeps the status lines in ``lines`` and draws nothing else
    (a program embedding the pipeline, or a test reading what it said).

    Args:
        lines: where the lines go (default: a new list, :attr:`lines`).
    """

    def __init__(self, lines: list[str] | None = None) -> None:
        super().__init__(Console(file=io.StringIO(), width=200))
        self.lines: list[str] = [] if lines is None else lines

    def echo(self, text: str) -> None:
        """A status line, kept."""
        self.lines.append(text)
        log.info(text)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


class ProgressHandle:
    """Feeds a progress bar, or prints about ten plain lines when there is no terminal."""

    def __init__(self, ui: PipelineUI, description: str, total: int | None) -> None:
        self.ui = ui
        self.description = description
        self.total = total
        self.done = 0
        self._reported = 0
        self._bar: Progress | None = None
        self._task: Any = None

    def attach(self, bar: Progress, task: Any) -> None:
        self._bar, self._task = bar, task

    def start(self, total: int) -> None:
        """Set the total once it is known."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.update(self.done + n, self.total)

    def update(self, done: int, total: int | None) -> None:
        """Absolute progress: ``done`` of ``total``."""
        if total != self.total and total is not None:
            self.start(total)
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        if not self.ui.live and self.total:
            tenth = done * 10 // self.total
            if tenth > self._reported:
                self._reported = tenth
                self.ui.echo(f"{self.description}: {done}/{self.total}")

    def finish(self) -> None:
        if self.done:
            log.info("%s: %d done", self.description, self.done)

    @property
    def on_block(self) -> Callable[[int, int], None]:
        """The ``(done, total)`` callback form."""
        return self.update


class _HistoryWatcher(threading.Thread):
    """Echoes the records appended to ``<experiment>/history.jsonl`` while a training runs."""

    POLL_S = 0.5
    POLL_REMOTE_S = 2.0  # one GET per poll on an object store

    def __init__(self, experiment: Location, epochs: int, ui: PipelineUI, bar: ProgressHandle):
        super().__init__(name="stkd-epoch-watcher", daemon=True)
        self.path = experiment / "history.jsonl"
        self.interval = self.POLL_REMOTE_S if is_remote(experiment) else self.POLL_S
        self.epochs = epochs
        self.ui = ui
        self.bar = bar
        self._halt = threading.Event()
        # records of earlier invocations (a resumed run) are not this training's progress
        self._offset = len(self._read())

    def _read(self) -> bytes:
        return read_bytes(self.path) if exists(self.path) else b""

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()
        self.poll()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def poll(self) -> None:
        from stkd_dist.train.ray_session import format_epoch

        data = self._read()[self._offset :]
        # only whole lines: the controller may be halfway through writing the last one
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                text = format_epoch(record, self.epochs)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            self.ui.echo(text)
            if record.get("ranks_in_sync") is False:
                self.ui.echo(
                    f"WARNING: ranks disagree on the model parameters after epoch "
                    f"{record['epoch'] + 1}: data-parallel training is broken"
                )
            if self.ui.live:  # without a terminal the epoch lines are the progress
                self.bar.update(int(record["epoch"]) + 1, self.epochs)


@contextlib.contextmanager
def run_log(logs: Location, command: str) -> Iterator[Location]:
    """Log this invocation (the pipeline's lines and Python logging) to ``logs``
    (``<run>/logs/<command>-<time>-<pid>.log``).

    With an object-store root the log is written to a local scratch file (logging appends line by
    line) and uploaded when the invocation ends, also when it fails.
    """
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dest = logs / name
    scratch = scratch_dir("log") if is_remote(dest) else None
    makedirs(logs)
    path = as_path(dest) if scratch is None else scratch / name
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = (logging.getLogger(), log)
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level > logging.INFO or lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
    try:
        yield dest
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
        if scratch is not None:
            try:
                write_bytes_atomic(dest, path.read_bytes())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
