"""A rich progress display for prediction runs: one bar over cases, one over the current case's windows."""

from __future__ import annotations

from collections.abc import Callable

from lorkd.io import printable


class CaseProgress:
    """``p.start(); tick = p.case(name); tick(done, total); p.advance(); ...; p.stop()``.

    Disabled (``enabled=False``, e.g. on ranks other than 0) it does nothing.
    """

    def __init__(self, total_cases: int, enabled: bool = True) -> None:
        self.total_cases = total_cases
        self.enabled = enabled
        self._progress = None
        self._cases = self._windows = None

    def start(self) -> None:
        if not self.enabled or self._progress is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._progress.start()
        self._cases = self._progress.add_task("cases", total=self.total_cases)
        self._windows = self._progress.add_task("windows", total=None)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def case(self, name: str) -> Callable[[int, int], None] | None:
        """Start a case; returns the window callback ``(done, total)`` (None when disabled)."""
        progress = self._progress
        if progress is None:
            return None
        progress.update(self._cases, description=f"cases ({printable(name)})")
        progress.reset(self._windows, total=None, description="windows")

        def windows(done: int, total: int) -> None:
            progress.update(self._windows, completed=done, total=total)

        return windows

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._cases)
