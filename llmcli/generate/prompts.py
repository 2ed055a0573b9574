"""Prompts for `llmcli generate` from --prompt, a file or stdin: text lines (with escapes) or JSONL,
read lazily, with a PAUSE marker when a pipe goes quiet so a slow stream is answered as it comes.
"""

from __future__ import annotations

import json
import os
import select
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from llmcli.errors import ConfigError, DataError

PAUSE_S = 0.3  # piped input quiet this long: answer what has arrived instead of waiting for a full window


@dataclass
class Prompt:
    text: str
    extra: dict[str, Any] = field(default_factory=dict)  # JSONL fields passed through untouched


PAUSE = object()  # in the prompt stream: the input went quiet (see PAUSE_S)


def read_prompts(prompts: list[str] | None, input_path: str | None, input_format: str) -> Iterator[Prompt | object]:
    """Prompts from --prompt, --input FILE ('-' = stdin), or stdin when it is piped, read lazily:
    a long or endless input (`tail -f log | llmcli generate ...`) is answered window by window.
    From a pipe or terminal, PAUSE marks where no new line came for PAUSE_S seconds."""
    if input_path is None and not prompts and not sys.stdin.isatty():
        input_path = "-"
    if input_path is None and not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT, --input FILE, or pipe prompts on stdin")
    if input_path not in (None, "-") and not os.path.isfile(input_path):
        raise DataError(f"--input: file not found: {input_path}")
    return _prompt_stream(prompts or [], input_path, input_format)


def _prompt_stream(prompts: list[str], input_path: str | None, input_format: str) -> Iterator[Prompt | object]:
    for p in prompts:
        yield Prompt(_unescape(p))
    if input_path == "-":
        yield from _parse_lines(sys.stdin.buffer, "<stdin>", input_format)
    elif input_path is not None:
        with open(input_path, "rb") as fh:
            yield from _parse_lines(fh, input_path, input_format)


def _parse_lines(stream, name: str, input_format: str) -> Iterator[Prompt | object]:
    line_no = 0
    for raw in _read_lines(stream):
        if raw is PAUSE:
            yield PAUSE
            continue
        line_no += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{name}:{line_no}: not valid UTF-8 ({err.reason})") from None
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if input_format == "jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}:{line_no}: malformed JSON line ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise DataError(f"{name}:{line_no}: expected a JSON object with a string 'prompt' field")
            text = obj.pop("prompt")
            yield Prompt(text, obj)
        else:
            yield Prompt(_unescape(line))


def _read_lines(stream) -> Iterator[bytes | object]:
    """The lines of a binary stream. A pipe or terminal is read with raw reads on its fd, so that
    select() can tell when it has gone quiet: then PAUSE, once, and wait for more without a timeout."""
    try:
        fd = stream.fileno()
        pollable = os.name == "posix" and not stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # in-memory streams (tests, embedding) have no fd
        pollable = False
    if not pollable:
        yield from stream
        return
    pending: list[bytes] = []  # complete lines read but not yet handed out, in reverse order
    partial, timeout = b"", PAUSE_S
    while True:
        if pending:
            yield pending.pop()
            timeout = PAUSE_S
            continue
        if not select.select([fd], [], [], timeout)[0]:
            yield PAUSE
            timeout = None
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if partial:
                yield partial
            return
        *lines, partial = (partial + chunk).split(b"\n")
        pending = [line + b"\n" for line in reversed(lines)]


def _unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` escapes, so one line can hold a multi-line prompt."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
