"""`llmcli report`: training runs side by side, read from their run-dir files alone (never torch).

    llmcli report runs/a runs/b                      # one table: model, params, steps, tokens, time, metrics, status
    llmcli report runs/sweep --json                  # {"runs": [{"path", "status", "step", ...}]}, in the order given
    llmcli report 'runs/*' --output compare.png      # their curves overlaid in one PNG
    llmcli report runs/a runs/b --plot               # loss curves drawn in the terminal (SSH)
    llmcli report runs/big --watch --interval 30     # refresh until nothing is running

A RUN is a run dir, a dir of run dirs (a sweep) or a glob. Status: `finished` (summary.json and
no live lock), `running` (the lock's pid is alive on this host, or the lock is another host's),
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

from llmcli import console, curves, runs
from llmcli.errors import ConfigError

STATUSES = ("finished", "running", "interrupted", "failed")
_RUN_MARKERS = ("metrics.jsonl", "summary.json", runs.LOCK_NAME)
_EVAL_NOISE = ("_runtime", "_samples_per_second", "_steps_per_second", "_per_class", "confusion_matrix")
_EXIT_SIGINT = 130


def run(paths: list[str], as_json: bool = False, plot: bool = False, watch: bool = False, interval: float = 10.0,
        output: str | None = None) -> int:
    """The whole command; returns the exit code (130 when --watch is stopped with Ctrl-C)."""
    if as_json and plot:
        raise ConfigError("--plot draws on stdout, which --json keeps for the JSON: use one or the other")
    dirs = expand(paths)
    if output is not None and not Path(output).parent.is_dir():
        raise ConfigError(f"--output {output}: directory {Path(output).parent} does not exist")
    if watch:
        rows = _watch(dirs, interval, as_json)
        if rows is None:
            return _EXIT_SIGINT
    else:
        rows = [inspect_run(d) for d in dirs]
        if not as_json:
            print_table(rows)
    if as_json:
        print(json.dumps({"runs": [_finite(r) for r in rows]}, indent=2, allow_nan=False))
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
    if any((path / m).exists() for m in _RUN_MARKERS) or runs.list_checkpoints(path):
        return True
    return not strict and (path / "config.yaml").is_file()


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------------
# One run


def inspect_run(path: str | os.PathLike) -> dict[str, Any]:
    """Everything the report shows about one run dir, from its files (a JSON-ready dict)."""
    path = Path(path)
    records = curves.read_metrics(path)
    summary = _read_json(path / "summary.json") or {}
    cfg = _read_yaml(path / "config.yaml")
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    lock = _lock_state(path / runs.LOCK_NAME)
    checkpoints = [s for s, p in runs.list_checkpoints(path) if runs.checkpoint_is_complete(p)]
    logged = max((r["step"] for r in records), default=0)

    if lock is not None and lock["live"]:
        status = "running"
    elif summary and (summary.get("global_step") or 0) >= logged:
        status = summary["status"] if summary.get("status") in STATUSES else "finished"
    else:
        status = "interrupted"  # no summary, or a later session (a resume) stopped before writing its own
    step = summary.get("global_step") if status == "finished" else None
    if step is None:
        step = max([logged, *checkpoints, summary.get("global_step") or 0])

    task = _task(summary, cfg, path, records)
    metric, greater = main_metric(records, summary, training)
    final, best, best_step = _metric_values(records, summary if status == "finished" else {}, metric, greater)
    tokens = summary.get("train_tokens") if status == "finished" else None
    if not tokens:
        tokens = int(_last(records, "num_input_tokens_seen") or 0) or None
    train_time = _train_time(records, summary, status)
    max_steps = training.get("max_steps") if isinstance(training.get("max_steps"), int) and training["max_steps"] > 0 else None
    row: dict[str, Any] = {
        "path": str(path),
        "status": status,
        "step": step,
        "max_steps": max_steps,
        "checkpoint": checkpoints[-1] if checkpoints else None,
        "task": task,
        "model": _model_name(path, cfg),
        "base_model": (cfg.get("model") or {}).get("model_name_or_path") if isinstance(cfg.get("model"), dict) else None,
        "params": summary.get("params") or summary.get("num_parameters") or count_parameters(path),
        "tokens": tokens,
        "train_time_s": train_time,
        "tokens_per_second": tokens / train_time if tokens and train_time else None,
        "loss": _last(records, "loss"),
        "metric": metric,
        "greater_is_better": greater,
        "final": final,
        "best": best,
        "best_step": best_step,
        "perplexity": summary.get("perplexity") if status == "finished" and "perplexity" in summary else _last(records, "eval_perplexity"),
        "eval": _final_eval(records, summary if status == "finished" else {}),
        "updated": max((r.get("time") for r in records if isinstance(r.get("time"), (int, float))), default=None),
    }
    if status == "failed":
        row["error"] = summary.get("error")
    if lock is not None:
        row["lock"] = {k: lock.get(k) for k in ("pid", "host", "started")}
    return row


def main_metric(records: list[dict], summary: dict, training: dict) -> tuple[str | None, bool]:
    """(metric name, greater is better): `training.metric_for_best_model` when set, else
    eval_accuracy (classifiers), eval_loss, reward (feedback methods), or the training loss."""
    configured = training.get("metric_for_best_model")
    if configured:
        name = configured if configured.startswith("eval_") else f"eval_{configured}"
        greater = training.get("greater_is_better")
        return name, bool(greater) if greater is not None else not name.endswith("loss")
    keys = set(summary)
    for record in records:
        keys.update(record)
    for name, greater in (("eval_accuracy", True), ("eval_loss", False), ("reward", True), ("loss", False)):
        if name in keys:
            return name, greater
    return None, False


def _metric_values(records, summary, metric, greater):
    if metric is None:
        return None, None, None
    steps, values = curves.series(records, metric)
    final = summary.get(metric) if isinstance(summary.get(metric), (int, float)) else (values[-1] if values else None)
    if not values:
        return final, final, None
    pick = max if greater else min
    best = pick(values)
    return final, (pick(best, final) if final is not None else best), steps[values.index(best)]


def _final_eval(records, summary) -> dict[str, float]:
    out: dict[str, float] = {}
    for source in [*records, summary]:
        for key, value in source.items():
            if key.startswith("eval_") and not key.endswith(_EVAL_NOISE) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = value
    return out


def _last(records, key):
    _, values = curves.series(records, key)
    return values[-1] if values else None


def _train_time(records, summary, status) -> float | None:
    """Training time summed over the run's sessions (a resume starts a new one). Trainer logs
    each session's running `train_runtime`; a session ends with its train_loss record."""
    total, current, last_time, seen = 0.0, 0.0, None, False
    for record in records:
        runtime = record.get("train_runtime")
        if not isinstance(runtime, (int, float)):
            continue
        seen = True
        if curves.SESSION_END_KEY in record:
            total, current = total + runtime, 0.0
            continue
        if runtime < current:  # a new session began without an end record (its process was killed)
            total += current
        current, last_time = runtime, record.get("time")
    if not seen:
        return summary.get("train_runtime_s")
    if current and status == "running" and isinstance(last_time, (int, float)):
        current += max(0.0, time.time() - last_time)  # still going: count up to now
    return total + current


def _task(summary, cfg, path, records) -> str | None:
    if summary.get("task"):
        return summary["task"]
    if cfg.get("task") not in (None, "auto"):
        return cfg["task"]
    arch = " ".join((_model_config(path) or {}).get("architectures") or [])
    for marker, task in (("ForSequenceClassification", "classification"), ("ForMaskedLM", "masked-lm"), ("LMHead", "causal-lm"), ("ForCausalLM", "causal-lm")):
        if marker in arch:
            return task
    if any("eval_accuracy" in r for r in records):
        return "classification"
    return cfg.get("task")


def _model_config(path: Path) -> dict | None:
    """config.json of the final model, a LoRA run's merged model, or the newest checkpoint."""
    places = [path, path / "merged", *[p for _, p in reversed(runs.list_checkpoints(path))]]
    for place in places:
        data = _read_json(place / "config.json")
        if data:
            return data
    return None


def _model_name(path: Path, cfg: dict) -> str | None:
    """'gpt2 2x64' (type, layers x width) from the saved model config, else the configured model."""
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    config = _model_config(path)
    if not config and not model.get("model_name_or_path") and isinstance(model.get("config_overrides"), dict):
        config = {"model_type": model.get("model_type"), **model["config_overrides"]}  # from scratch, nothing saved yet
    if config:
        layers = next((config[k] for k in ("n_layer", "num_hidden_layers", "num_layers") if isinstance(config.get(k), int)), None)
        width = next((config[k] for k in ("n_embd", "hidden_size", "d_model") if isinstance(config.get(k), int)), None)
        name = config.get("model_type") or model.get("model_type")
        return f"{name} {layers}x{width}" if layers and width else name
    base = model.get("model_name_or_path")
    return Path(base).name if base else model.get("model_type")


def count_parameters(path: Path) -> int | None:
    """Parameters in the saved weights, read from the safetensors headers (tied weights are
    stored once, as `model.num_parameters()` counts them)."""
    places = [path, path / "merged", *[p for _, p in reversed(runs.list_checkpoints(path))]]
    for place in places:
        files = []
        index = _read_json(place / "model.safetensors.index.json")
        if index and isinstance(index.get("weight_map"), dict):
            files = sorted({place / f for f in index["weight_map"].values()})
        elif (place / "model.safetensors").is_file():
            files = [place / "model.safetensors"]
        if files:
            try:
                return sum(_safetensors_numel(f) for f in files)
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


def _safetensors_numel(file: Path) -> int:
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{file}: not a safetensors file")
        header = json.loads(fh.read(size))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _lock_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    holder = _read_json(path)
    if not holder:  # being written right now, or left by a process killed while writing it
        try:
            young = time.time() - path.stat().st_mtime < 10
        except OSError:
            return None
        return {"live": young}
    if holder.get("host") != socket.gethostname():
        return {**holder, "live": True}  # another machine's run: its pid cannot be checked from here
    try:
        live = runs.pid_alive(int(holder.get("pid")))
    except (TypeError, ValueError, OverflowError):
        live = False
    return {**holder, "live": live}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The cron line


def final_line(command: str, run_dir: str | os.PathLike, status: str, summary: dict | None = None) -> str:
    """`llmcli: pretrain runs/x finished step=600 eval_loss=1.4727`: the one stderr line a
    `--quiet` run ends with (for cron mail). `summary` is the run's summary dict when it has one;
    otherwise the step and metric are read from the run dir."""
    summary = summary or {}
    info = inspect_run(run_dir)
    step = summary.get("global_step", info["step"])
    line = f"llmcli: {command} {run_dir} {status} step={step}"
    metric, value = info["metric"], summary.get(info["metric"]) if info["metric"] else None
    if value is None:
        value = info["final"]
    if metric and isinstance(value, (int, float)):
        line += f" {metric}={value:.6g}"
    return line


# --------------------------------------------------------------------------------------------
# Output


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
        out.append([
            r["path"], r["model"] or "-", _num(r["params"], curves.human), r["task"] or "-", steps, _num(r["tokens"], curves.human),
            _num(r["train_time_s"], _duration), _num(r["tokens_per_second"], lambda v: f"{v:,.0f}"),
            r["metric"] or "-", _num(r["final"], _metric_text), _num(r["best"], _metric_text), status,
        ])
    return out


def print_table(rows: list[dict[str, Any]], live=None) -> None:
    cells = table_rows(rows)
    if sys.stdout.isatty() or live is not None:
        from rich.console import Console
        from rich.table import Table

        tab = Table(show_lines=False)
        for name in _COLUMNS:
            tab.add_column(name, justify="left" if name in ("run", "model", "task", "metric", "status") else "right", overflow="fold")
        for row in cells:
            tab.add_row(*row)
        if live is not None:
            live.update(tab, refresh=True)
        else:
            Console().print(tab)
        return
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


def _watch(dirs: list[Path], interval: float, as_json: bool) -> list[dict] | None:
    """Refresh until no run is running (a TTY redraws in place; a pipe gets a table whenever a
    run's step or status changes). Returns the last rows, or None after Ctrl-C."""
    live = None
    shown = None
    try:
        if sys.stdout.isatty() and not as_json:
            from rich.live import Live

            live = Live(auto_refresh=False, transient=False)
            live.start()
        while True:
            rows = [inspect_run(d) for d in dirs]
            state = [(r["status"], r["step"]) for r in rows]
            if not as_json and (live is not None or state != shown):
                if live is None and shown is not None:
                    print(f"\n{time.strftime('%H:%M:%S')}")
                print_table(rows, live)
                shown = state
            if not any(r["status"] == "running" for r in rows):
                return rows
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
