"""Progress reporting for long work: a no-op for library callers, a rich bar on stderr for the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class NullProgress:
    def start(self, description: str, total_bytes: int, total_items: int) -> None: ...

    def advance(self, item: str, nbytes: int) -> None: ...

    def stop(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


class RichProgress(NullProgress):
    """Two bars on stderr: bytes (with rate and ETA) and items (tensors, cells, steps)."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = None

    def start(self, description: str, total_bytes: int, total_items: int) -> None:
        self.stop()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[item]}", style="dim"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.bytes_task = self.progress.add_task(description, total=total_bytes or None, item="")
        self.items_task = self.progress.add_task("tensors", total=total_items, item="")
        self.progress.start()

    def advance(self, item: str, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.update(self.bytes_task, advance=nbytes, item=item[-48:])
            self.progress.update(self.items_task, advance=1)

    def stop(self) -> None:
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
        self.items_task = self.progress.add_task(description, total=total_items or None, item="")
        self.progress.start()

    def advance(self, item: str, nbytes: int = 0) -> None:
        if self.progress is not None:
            self.progress.update(self.items_task, advance=1, item=item[-48:])
