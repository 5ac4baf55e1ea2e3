"""Progress reporting for long work: a no-op for library callers; for the CLI, a rich bar on a terminal and
plain lines (`kbit: encode 35% (12/35 tensors, 40.1 MB/115 MB) 3.2 s elapsed, ~6 s left`) on a log or pipe.

Every reporter has the same calls: start(stage, total_bytes, total_items), advance(item, nbytes), stop().
"""

from __future__ import annotations

import threading
import time
import weakref

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

# what a stage counts (its items); a stage not named here counts tensors
UNITS = {"calibrate": "blocks", "ppl": "batches", "embed": "batches", "scaling": "cells", "bench speed": "steps"}

# reporters started and not yet stopped: the CLI stops them when a command fails, so that no bar or
# heartbeat line is left running under (or after) the error line
_ACTIVE: "weakref.WeakSet[NullProgress]" = weakref.WeakSet()


def unit_of(stage: str) -> str:
    return UNITS.get(stage, "tensors")


def stop_all(failed: bool = False) -> None:
    """Stop every reporter still running (a stage an exception left open)."""
    for p in list(_ACTIVE):
        p.stop(failed=failed) if isinstance(p, LineProgress) else p.stop()


class NullProgress:
    def start(self, description: str, total_bytes: int, total_items: int) -> None: ...

    def advance(self, item: str, nbytes: int) -> None: ...

    def stop(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


class _AmountColumn(ProgressColumn):
    """Bytes for the bytes bar (`40.1/115.0 MB`), a count with its unit for the items bar (`12/35 tensors`)."""

    def __init__(self):
        super().__init__()
        self.download = DownloadColumn()

    def render(self, task) -> Text:
        unit = task.fields.get("unit")
        if unit is None:
            return self.download.render(task)
        total = "?" if task.total is None else f"{int(task.total)}"
        return Text(f"{int(task.completed)}/{total} {unit}", style="progress.download")


class RichProgress(NullProgress):
    """On a terminal's stderr: a bytes bar (with rate and ETA) and an items bar (tensors, blocks, steps); a stage
    that reports no bytes (calibration) gets the items bar only."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = None

    def start(self, description: str, total_bytes: int, total_items: int) -> None:
        self.stop()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(),
                                 TextColumn("{task.fields[item]}", style="dim"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        unit = unit_of(description)
        self.bytes_task = self.progress.add_task(description, total=total_bytes, item="") if total_bytes else None
        self.items_task = self.progress.add_task(unit if self.bytes_task is not None else description,
                                                 total=total_items or None, item="", unit=unit)
        self.progress.start()
        _ACTIVE.add(self)

    def advance(self, item: str, nbytes: int) -> None:
        if self.progress is not None:
            if self.bytes_task is not None:
                self.progress.update(self.bytes_task, advance=nbytes, item=item[-48:])
                self.progress.update(self.items_task, advance=1)
            else:
                self.progress.update(self.items_task, advance=1, item=item[-48:])

    def stop(self) -> None:
        _ACTIVE.discard(self)
        if self.progress is not None:
            self.progress.stop()
            self.progress = None



class StepProgress(RichProgress):
    """One bar counting steps (batches, cells) with the current item, for work that is not about bytes.
    Same start/advance/stop calls as RichProgress; total_bytes is ignored."""

    def start(self, description: str, total_bytes: int, total_items: int) -> None:
        self.stop()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[item]}", style="dim"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.bytes_task = None
        self.items_task = self.progress.add_task(description, total=total_items or None, item="")
        self.progress.start()
        _ACTIVE.add(self)

    def advance(self, item: str, nbytes: int = 0) -> None:
        if self.progress is not None:
            self.progress.update(self.items_task, advance=1, item=item[-48:])


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} TB" if n >= 100 else f"{n:.1f} TB"


def _seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


class LineProgress(NullProgress):
    """Plain lines on stderr when it is not a terminal (a CI log, `2>log`, `| cat`), as pip and tqdm print there:

        kbit: encode: 35 tensors, 115 MB
        kbit: encode 35% (12/35 tensors, 40.1 MB/115 MB) 3.2 s elapsed, ~6 s left
        kbit: encode 100% (35/35 tensors, 115 MB/115 MB) done in 9.1 s

    A status line comes every `interval` seconds (from a background thread, so a single slow tensor still
    shows the run is alive) or at each further 10% of the work, whichever comes first (but not two within
    `min_gap` seconds). The start line waits `grace` seconds: a stage that fails before that prints nothing,
    so the error stays the one line on stderr; a stage that ends before that prints its start and end lines.

    Subclasses NullProgress: callers that pick a richer display only for a terminal (finetune's training bar)
    treat it as "no live display"."""

    def __init__(self, console: Console, *, interval: float = 5.0, grace: float = 2.0, min_gap: float = 1.0,
                 clock=time.monotonic):
        self.console = console
        self.interval, self.grace, self.min_gap, self.clock = interval, grace, min_gap, clock
        self.lock = threading.Lock()
        self.stage = None
        self.thread = None
        self.wake = threading.Event()

    # ---- the protocol
    def start(self, description: str, total_bytes: int, total_items: int) -> None:
        self.stop()
        with self.lock:
            self.file = self.console.file  # now, in the caller's thread (test runners swap sys.stderr)
            self.stage, self.unit = description, unit_of(description)
            self.total_bytes, self.total_items = max(0, int(total_bytes or 0)), max(0, int(total_items or 0))
            self.done_bytes = self.done_items = 0
            self.t0 = self.last = self.clock()
            self.announced, self.decile = False, 0
        self.wake.clear()
        self.thread = threading.Thread(target=self._tick, daemon=True, name="kbit-progress")
        self.thread.start()
        _ACTIVE.add(self)

    def advance(self, item: str, nbytes: int = 0) -> None:
        with self.lock:
            if self.stage is None:
                return
            self.done_items += 1
            self.done_bytes += max(0, int(nbytes or 0))
            frac = self._fraction()
            if self.announced and frac is not None and int(frac * 10) > self.decile \
                    and self.clock() - self.last >= self.min_gap:
                self._emit(self._status())

    def stop(self, failed: bool = False) -> None:
        _ACTIVE.discard(self)
        thread, self.thread = self.thread, None
        if thread is not None:
            self.wake.set()
            if thread is not threading.current_thread():
                thread.join()
        with self.lock:
            if self.stage is None:
                return
            finished = not failed and (self.total_items == 0 or self.done_items >= self.total_items) and \
                (self.total_bytes == 0 or self.done_bytes >= self.total_bytes)
            if finished or self.announced:
                if not self.announced:
                    self._emit(self._start_line())
                elapsed = _seconds(self.clock() - self.t0)
                if finished:
                    self._emit(f"kbit: {self.stage}{self._percent(1.0)} {self._counts()}done in {elapsed}")
                else:
                    frac = self._fraction()
                    self._emit(f"kbit: {self.stage} stopped at{self._percent(frac)} {self._counts()}after {elapsed}")
            self.stage = None

    # ---- lines
    def _fraction(self):
        if self.total_bytes:
            return min(1.0, self.done_bytes / self.total_bytes)
        if self.total_items:
            return min(1.0, self.done_items / self.total_items)
        return None

    @staticmethod
    def _percent(frac) -> str:
        return "" if frac is None else f" {int(frac * 100)}%"

    def _counts(self) -> str:
        parts = [f"{self.done_items}/{self.total_items} {self.unit}" if self.total_items else f"{self.done_items} {self.unit}"]
        if self.total_bytes:
            parts.append(f"{_bytes(self.done_bytes)}/{_bytes(self.total_bytes)}")
        return f"({', '.join(parts)}) "

    def _start_line(self) -> str:
        what = [f"{self.total_items} {self.unit}"] if self.total_items else []
        what += [_bytes(self.total_bytes)] if self.total_bytes else []
        return f"kbit: {self.stage}: {', '.join(what)}" if what else f"kbit: {self.stage}: started"

    def _status(self) -> str:
        elapsed = self.clock() - self.t0
        frac = self._fraction()
        line = f"kbit: {self.stage}{self._percent(frac)} {self._counts()}{_seconds(elapsed)} elapsed"
        if frac and elapsed > 0 and frac < 1:
            line += f", ~{_seconds(elapsed * (1 - frac) / frac)} left"
        if frac is not None:
            self.decile = int(frac * 10)
        return line

    def _emit(self, line: str) -> None:
        self.last = self.clock()
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) must not turn progress into an error
            pass

    def _tick(self) -> None:
        step = min(0.5, self.interval / 4, self.grace / 4 if self.grace > 0 else 0.5)
        while not self.wake.wait(max(step, 0.01)):
            with self.lock:
                if self.stage is None:
                    return
                now = self.clock()
                if not self.announced:
                    if now - self.t0 >= self.grace:
                        self.announced = True
                        self._emit(self._start_line())
                elif now - self.last >= self.interval:
                    self._emit(self._status())
