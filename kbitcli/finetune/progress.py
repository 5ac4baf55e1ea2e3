"""Training progress on stderr: steps done, last loss, tokens/s, elapsed and remaining time — a rich bar on a
terminal, plain lines elsewhere (CI logs, `2>log`)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class NullTrainProgress:
    def start(self, total_steps: int, done: int) -> None: ...

    def update(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def note(self, text: str) -> None: ...

    def stop(self) -> None: ...


class RichTrainProgress(NullTrainProgress):
    def __init__(self, console: Console):
        self.console = console
        self.progress = None

    def start(self, total_steps: int, done: int) -> None:
        self.stop()
        self.progress = Progress(TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("steps", total=total_steps, completed=done, loss="-", tps="-")
        self.progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def note(self, text: str) -> None:
        # printed above the bar (rich keeps the bar at the bottom)
        self.console.print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LineTrainProgress(NullTrainProgress):
    """One line every `interval` seconds of training (and at the end), for logs that are not a terminal:
        kbit: finetune step 120/300 (40%), loss 2.3141, 5,210 tok/s, 31 s elapsed, ~46 s left"""

    def __init__(self, console: Console, interval: float = 10.0, clock=time.monotonic):
        self.console, self.interval, self.clock = console, interval, clock
        self.total = 0

    def start(self, total_steps: int, done: int) -> None:
        self.total, self.first, self.t0 = total_steps, done, self.clock()
        self.last_line = self.t0
        self.console.print(f"kbit: finetune: {total_steps - done} steps to go ({done} done)", highlight=False)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = self.clock()
        if now - self.last_line < self.interval and step < self.total:
            return
        self.last_line = now
        elapsed = now - self.t0
        left = elapsed / (step - self.first) * (self.total - step) if step > self.first else None
        eta = f", ~{left:.0f} s left" if left is not None and step < self.total else ""
        self.console.print(f"kbit: finetune step {step}/{self.total} ({100 * step // max(self.total, 1)}%), "
                           f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s, {elapsed:.0f} s elapsed{eta}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(f"kbit: {text}", highlight=False)
