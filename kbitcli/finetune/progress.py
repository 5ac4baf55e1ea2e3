"""A training progress bar on stderr: steps done, last loss, tokens/s, elapsed and remaining time."""

from __future__ import annotations

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
