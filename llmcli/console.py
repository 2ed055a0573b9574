"""Terminal output: diagnostics on stderr, rich on a TTY, plain lines otherwise (cron logs).

Data (generated text, `--json` results, summary tables) goes to stdout; everything else here
goes to stderr so pipelines stay clean. `--quiet` silences all but errors.
"""

from __future__ import annotations

import sys
from typing import Any

_state = {"quiet": False, "debug": False, "summaries_to_stderr": False}


def configure(quiet: bool = False, debug: bool = False) -> None:
    _state.update(quiet=quiet, debug=debug, summaries_to_stderr=False)
    if not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Transformers/datasets logs, progress bars and warnings off (set before they are imported)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not stderr_is_tty() or quiet():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")


def summaries_to_stderr() -> None:
    """Training commands' closing tables go to stderr from now on: a sweep's stdout is its leaderboard."""
    _state["summaries_to_stderr"] = True


def quiet() -> bool:
    return _state["quiet"]


def debug() -> bool:
    return _state["debug"]


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if not _state["quiet"]:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def table(title: str, rows: list[tuple[str, Any]], to_stderr: bool = False) -> None:
    """A two-column table: rich on a terminal, `key: value` lines otherwise."""
    if _state["quiet"]:
        return
    to_stderr = to_stderr or _state["summaries_to_stderr"]  # a sweep's stdout is its leaderboard alone
    stream = sys.stderr if to_stderr else sys.stdout
    if stream.isatty():
        from rich.console import Console
        from rich.table import Table

        tab = Table(title=title, show_header=False)
        tab.add_column("metric", style="bold")
        tab.add_column("value", justify="right")
        for key, value in rows:
            tab.add_row(key, format_value(value))
        Console(stderr=to_stderr).print(tab)
    else:
        print(title, file=stream)
        for key, value in rows:
            print(f"  {key}: {format_value(value)}", file=stream)
        stream.flush()


_NOISY = ("_runtime", "_samples_per_second", "_steps_per_second", "num_input_tokens_seen", "_per_class", "confusion_matrix")


def summary_table(command: str, run_dir: str, summary: dict[str, Any]) -> None:
    """A training command's closing table (main process only; noisy keys left to summary.json)."""
    from llmcli.dist import is_main_process

    if is_main_process():
        shown = [(k, v) for k, v in summary.items() if v is not None and not k.endswith(_NOISY)]
        table(f"{command} finished: {run_dir}", shown, to_stderr=_state["summaries_to_stderr"])


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def progress(description: str, total: int | None = None):
    """A rich progress bar on stderr when it is a TTY and not quiet; otherwise a no-op."""
    return _Progress(description, total, enabled=stderr_is_tty() and not _state["quiet"])


class _Progress:
    def __init__(self, description: str, total: int | None, enabled: bool):
        self.enabled = enabled
        self.description = description
        self.total = total
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=_err_console(), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self._bar is not None:
            kwargs = {"status": status} if status is not None else {}
            self._bar.update(self._task, advance=n, **kwargs)

    def update(self, completed: int | None = None, total: int | None = None, status: str | None = None) -> None:
        if self._bar is not None:
            kwargs = {k: v for k, v in (("completed", completed), ("total", total), ("status", status)) if v is not None}
            self._bar.update(self._task, **kwargs)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
