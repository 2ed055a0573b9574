"""Exit codes and the errors that map onto them.

Every command raises one of these for anything the user can fix; `cli.py` turns it into a
one-line message on stderr and the exit code below (a traceback only with `--debug`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: NaN loss, CUDA error, a bug
EXIT_USAGE = 2  # bad flag, bad config key/value/type, missing model or config file
EXIT_GATE = 3  # `eval --fail-under/--fail-over` gate failed
EXIT_DATA = 4  # bad data: missing/empty file, wrong column, bad UTF-8/JSON line, bad labels
EXIT_LOCKED = 75  # output dir is locked by another live run (EX_TEMPFAIL: try again later)
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class LlmcliError(Exception):
    """An error the user can act on; `str(err)` is the whole one-line message."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(LlmcliError):
    exit_code = EXIT_USAGE


class DataError(LlmcliError):
    exit_code = EXIT_DATA


class LockedError(LlmcliError):
    exit_code = EXIT_LOCKED


class GateFailed(LlmcliError):
    exit_code = EXIT_GATE


class TrainingFailed(LlmcliError):
    exit_code = EXIT_FAILURE


class Interrupted(LlmcliError):
    """Raised after a graceful stop on SIGINT/SIGTERM, once the checkpoint is on disk."""

    def __init__(self, signum: int, message: str):
        import signal

        super().__init__(message, EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message, for one-line errors that name the cause."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
