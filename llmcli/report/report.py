"""`llmcli report`: training runs side by side, read from their run-dir files alone (never torch).

    llmcli report runs/a runs/b                      # one table: model, params, steps, tokens, time, metrics, status
    llmcli report runs/sweep --json                  # {"runs": [{"path", "status", "step", ...}]}, in the order given
    llmcli report 'runs/*' --output compare.png      # their curves overlaid in one PNG
    llmcli report runs/a runs/b --plot               # loss curves drawn in the terminal (SSH)
    llmcli report runs/big --watch --interval 30     # refresh until nothing is running

A RUN is a run dir, a dir of run dirs (a sweep) or a glob. Status: `finished` (summary.json and
no held lock), `pruned` (a sweep trial its pruner stopped), `running` (the run lock is held, asked
of the kernel; or the lock is another host's),
`interrupted` (no summary and no live lock: the same command resumes it), `failed` (summary.json
says "status": "failed"). A summary older than the last logged step (a later session stopped
before writing its own) does not count.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console, layout
from llmcli.errors import EXIT_SIGINT, ConfigError
from llmcli.report import sweeps
from llmcli.report.sweeps import progress_line
from llmcli.report.runinfo import inspect_run
from llmcli.train import curves

_RUN_MARKERS = ("metrics.jsonl", "summary.json", layout.LOCK_NAME)


def run(paths: list[str], as_json: bool = False, plot: bool = False, watch: bool = False, interval: float = 10.0,
        output: str | None = None) -> int:
    """The whole command; returns the exit code (130 when --watch is stopped with Ctrl-C)."""
    if as_json and plot:
        raise ConfigError("--plot draws on stdout, which --json keeps for the JSON: use one or the other")
    dirs = expand(paths)
    if output is not None and not Path(output).parent.is_dir():
        raise ConfigError(f"--output {output}: directory {Path(output).parent} does not exist")
    if watch:
        snapshot = _watch(paths, interval, as_json)
        if snapshot is None:
            return EXIT_SIGINT
        dirs, rows, sweeps = snapshot
    else:
        dirs, rows, sweeps = _snapshot(paths, dirs)
        if not as_json:
            print_table(rows, sweeps=sweeps)
    if as_json:
        out = {"runs": [_finite(r) for r in rows], **({"sweeps": [_finite(w) for w in sweeps]} if sweeps else {})}
        print(json.dumps(out, indent=2, allow_nan=False))
    if output is not None:
        console.info(f"wrote {compare_png(dirs, rows, output)}")
    if plot:
        print(terminal_plot(dirs, rows), end="")
    return 0


# --------------------------------------------------------------------------------------------
# Finding run dirs


def expand(paths: list[str]) -> list[Path]:
    """Run dirs named by the arguments, in order: a run dir, the run dirs inside a sweep dir
    (natural order: trial-2 before trial-10), or the matches of a glob. Duplicates are dropped."""
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.exists():
            candidates, from_glob = [path], False
        elif glob.has_magic(given):
            candidates, from_glob = [Path(p) for p in sorted(glob.glob(given), key=_natural)], True
            if not candidates:
                raise ConfigError(f"{given}: the pattern matches nothing")
        else:
            raise ConfigError(f"{given}: no such run dir")
        found = []
        for cand in candidates:
            dirs = _run_dirs(cand)
            if not dirs and not from_glob:
                raise ConfigError(f"{cand}: not a run dir (no config.yaml, metrics.jsonl or summary.json) and holds none")
            found += dirs
        if not found:
            raise ConfigError(f"{given}: matches no run dir")
        out += found
    unique, seen = [], set()
    for d in out:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def _snapshot(paths: list[str], dirs: list[Path] | None = None):
    """(run dirs, their rows, the sweeps among the arguments): a sweep's trials carry the study's
    state and parameters, and one the study holds WAITING (requeued, or queued again after a
    failure) reads `waiting`, not interrupted."""
    dirs = expand(paths) if dirs is None else dirs
    found = [sweeps.inspect_sweep(d) for d in sweeps.sweep_dirs(paths)]
    rows = []
    for d in dirs:
        row = inspect_run(d)
        trial = sweeps.trial_of(d, found)
        if trial is not None:
            row["trial"] = trial
            if trial["state"] == "WAITING" and row["status"] == "interrupted":
                row["status"] = "waiting"
        rows.append(row)
    return dirs, rows, found


def _run_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    if _is_run_dir(path, strict=True):
        return [path]
    for depth in (1, 2):  # a sweep dir holds its trials' run dirs (or one more level of grouping)
        pattern = "/".join(["*"] * depth)
        found = [p for p in sorted(path.glob(pattern), key=lambda p: _natural(str(p))) if p.is_dir() and _is_run_dir(p)]
        if found:
            return found
    return [path] if _is_run_dir(path) else []


def _is_run_dir(path: Path, strict: bool = False) -> bool:
    """strict: it logged or locked something; otherwise a config.yaml is enough (a run that died early)."""
    if any((path / m).exists() for m in _RUN_MARKERS) or layout.list_checkpoints(path):
        return True
    return not strict and (path / "config.yaml").is_file()


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------------
# Output


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_COLUMNS = ("run", "model", "params", "task", "steps", "tokens", "time", "tok/s", "metric", "final", "best", "status")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The table's cells, as text."""
    out = []
    for r in rows:
        steps = f"{r['step']:,}" if r["status"] == "finished" or not r["max_steps"] else f"{r['step']:,}/{r['max_steps']:,}"
        status = r["status"]
        if status == "interrupted":
            status = f"interrupted at step {r['step']:,}"
            if r["checkpoint"] is not None and r["checkpoint"] != r["step"]:
                status += f" (resumes from {r['checkpoint']:,})"
            elif r["checkpoint"] is None:
                status += " (no checkpoint)"
        elif status == "running" and r.get("lock", {}).get("pid") is not None:
            status = f"running (pid {r['lock']['pid']}{'' if r['lock'].get('host') == socket.gethostname() else ' on ' + str(r['lock'].get('host'))})"
        elif status == "failed" and r.get("error"):
            status = f"failed: {str(r['error'])[:60]}"
        shown = r["path"]
        if r.get("trial") and r["trial"].get("params"):  # a sweep's trial: its parameters beside its dir
            shown += " " + " ".join(f"{k.rsplit('.', 1)[-1]}={_metric_text(v) if isinstance(v, float) else v}"
                                    for k, v in r["trial"]["params"].items())
        out.append([
            shown, r["model"] or "-", _num(r["params"], curves.human), r["task"] or "-", steps, _num(r["tokens"], curves.human),
            _num(r["train_time_s"], _duration), _num(r["tokens_per_second"], lambda v: f"{v:,.0f}"),
            r["metric"] or "-", _num(r["final"], _metric_text), _num(r["best"], _metric_text), status,
        ])
    return out


def print_table(rows: list[dict[str, Any]], live=None, sweeps: list[dict[str, Any]] = ()) -> None:
    """The runs' table, under one progress line per sweep."""
    cells = table_rows(rows)
    heading = [progress_line(w) for w in sweeps]
    if sys.stdout.isatty() or live is not None:
        from rich.console import Console
        from rich.table import Table

        tab = Table(show_lines=False, title="\n".join(heading) or None)
        for name in _COLUMNS:
            tab.add_column(name, justify="left" if name in ("run", "model", "task", "metric", "status") else "right", overflow="fold")
        for row in cells:
            tab.add_row(*row)
        if live is not None:
            live.update(tab, refresh=True)
        else:
            Console().print(tab)
        return
    for line in heading:
        print(line)
    widths = [max(len(c[i]) for c in [list(_COLUMNS), *cells]) for i in range(len(_COLUMNS))]
    for row in [list(_COLUMNS), *cells]:
        print("  ".join(c.ljust(w) if i in (0, 1, 3, 8, 11) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    sys.stdout.flush()


def _num(value, fmt) -> str:
    return "-" if value is None else fmt(value)


def _metric_text(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _watch(paths: list[str], interval: float, as_json: bool):
    """Refresh until no run is running and every sweep among the arguments is done (the run list is
    found again each time, so a sweep's new trials join it; a TTY redraws in place, a pipe gets a
    table whenever a run's step or status changes). Returns the last snapshot, or None after Ctrl-C."""
    live = None
    shown = None
    try:
        if sys.stdout.isatty() and not as_json:
            from rich.live import Live

            live = Live(auto_refresh=False, transient=False)
            live.start()
        while True:
            dirs, rows, found = _snapshot(paths)
            state = [(r["path"], r["status"], r["step"]) for r in rows]
            if not as_json and (live is not None or state != shown):
                if live is None and shown is not None:
                    print(f"\n{time.strftime('%H:%M:%S')}")
                print_table(rows, live, sweeps=found)
                shown = state
            if not any(r["status"] == "running" for r in rows) and all(w.get("done", True) for w in found):
                return dirs, rows, found
            time.sleep(interval)
    except KeyboardInterrupt:
        return None
    finally:
        if live is not None:
            live.stop()


def compare_png(dirs: list[Path], rows: list[dict[str, Any]], output: str | os.PathLike) -> Path:
    """One PNG overlaying the runs' training loss (smoothed) and their main eval metric."""
    from matplotlib.figure import Figure

    records = [curves.read_metrics(d) for d in dirs]
    metric = next((r["metric"] for r in rows if r["metric"] and r["metric"].startswith("eval_")), None)
    fig = Figure(figsize=(12 if metric else 7, 4.6))
    fig.subplots_adjust(left=0.07 if metric else 0.11, right=0.98, top=0.86, bottom=0.13, wspace=0.2)
    axes = fig.subplots(1, 2 if metric else 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(dirs))]
    losses = []
    for recs, row, color in zip(records, rows, colors):
        steps, values = curves.series(recs, "loss")
        if steps:
            shown = curves.smooth(values) if len(values) >= curves.SMOOTH_FROM else values
            if len(values) >= curves.SMOOTH_FROM:
                axes[0].plot(steps, values, color=color, alpha=0.2, linewidth=1)
            axes[0].plot(steps, shown, color=color, linewidth=2, label=row["path"])
            losses += values
    _log_if_wide(axes[0], losses)
    axes[0].set_title("training loss" + (" (smoothed)" if any(len(curves.series(r, "loss")[0]) >= curves.SMOOTH_FROM for r in records) else ""))
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    if metric:
        values_all = []
        for recs, row, color in zip(records, rows, colors):
            steps, values = curves.series(recs, metric)
            if steps:
                axes[1].plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.5, label=row["path"])
                values_all += values
        if metric == "eval_loss":
            _log_if_wide(axes[1], values_all)
        axes[1].set_title(metric.replace("_", " "))
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(metric.removeprefix("eval_"))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"{len(dirs)} run{'s' if len(dirs) != 1 else ''} ({time.strftime('%Y-%m-%d %H:%M')})")
    out = Path(output)
    curves.save_png(fig, out)
    return out


def _log_if_wide(ax, values) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > curves.LOG_RATIO:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def terminal_plot(dirs: list[Path], rows: list[dict[str, Any]], width: int | None = None) -> str:
    """The runs' training loss (and main eval metric) drawn with plotext, as text: one marker per
    run, keyed under each chart (an in-chart legend would hide the start of the curves)."""
    try:
        import plotext
    except ImportError:
        raise ConfigError("--plot needs plotext (pip install 'plotext>=6')") from None
    import shutil

    width = width or min(120, shutil.get_terminal_size((100, 24)).columns)
    colorless = not sys.stdout.isatty()
    records = [curves.read_metrics(d) for d in dirs]
    metric = next((r["metric"] for r in rows if r["metric"] and r["metric"].startswith("eval_")), None)
    text = ""
    for key in ("loss", metric):
        if key is None:
            continue
        fig = plotext.figure
        fig.clear()
        fig.plot_size(width, 20)
        fig.legend(active=False)
        keyed, smoothed = [], False
        for i, (recs, row) in enumerate(zip(records, rows)):
            steps, values = curves.series(recs, key)
            if not steps:
                continue
            if key == "loss" and len(values) >= curves.SMOOTH_FROM:
                values, smoothed = curves.smooth(values), True
            marker = _MARKERS[i % len(_MARKERS)]
            signal = fig.signal(steps, values, marker=marker)
            signal.lines()
            fig.draw(signal)
            keyed.append(f"  {marker} {row['path']}")
        if not keyed:
            continue
        fig.title("training loss" + (" (smoothed)" if smoothed else "") if key == "loss" else key.replace("_", " "))
        fig.label("step", "x")
        fig.label(key, "y")
        text += fig.build().string(colorless=colorless).rstrip() + "\n" + "\n".join(keyed) + "\n\n"
    return text or "no curves to plot: no run has logged a loss yet\n"


_MARKERS = ("•", "x", "+", "o", "*", "#", "@", "%", "=", "~")
