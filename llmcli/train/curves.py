"""Training curves from a run dir's metrics.jsonl: `curves.png`, redrawn while a run trains.

    python -c "from llmcli.curves import draw_curves; print(draw_curves('runs/shakespeare'))"

Panels (each only when its keys were logged): training loss (raw and smoothed) with eval loss,
eval perplexity (log scale) or eval accuracy/F1, learning rate, grad norm, and reward/KL for
feedback methods; x is the step, and the title gives the tokens seen when they were counted.
This module reads run-dir files only (no torch); matplotlib draws on its Agg canvas (no display,
no pyplot state). `CurvesCallback` (a TrainerCallback, built lazily) redraws at each evaluation,
checkpoint and at the end of training on the main process, and never stops training.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

CURVES_NAME = "curves.png"
SMOOTH_FROM = 10  # fewer training-loss points than this are drawn as they are
LOG_RATIO = 10  # a panel with "auto" scale goes logarithmic when its values span this ratio
SESSION_END_KEY = "train_loss"  # Trainer's end-of-train() record (train_runtime, train_loss, total_flos)
SESSION_START_KEY = "session_start"  # llmcli's record at the start of a resumed session (a killed one has no end record)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of <run_dir>/metrics.jsonl; a line cut short by a kill is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, sorted by step with one value per step (the last one logged
    wins, so a resumed run that logged a step twice still draws one continuous curve).
    Non-numeric and non-finite values are left out."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key == "loss" and SESSION_END_KEY in record:
            continue
        by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing). The default weight spans
    about 1/15 of the points: light on short runs, steady on long ones."""
    if weight is None:
        span = max(2.0, len(values) / 15)
        weight = 1 - 2 / (span + 1)
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def resume_steps(records: list[dict[str, Any]]) -> list[int]:
    """Steps at which a training session ended and a later one carried on (a resume): a session's end
    record followed by training, or a resumed session's start record (the only mark of a kill -9)."""
    ends = [i for i, r in enumerate(records) if SESSION_END_KEY in r]
    steps = {records[i]["step"] for i in ends if i < len(records) - 1 and any("loss" in r for r in records[i + 1:])}
    return sorted(steps | {r["step"] for r in records if r.get(SESSION_START_KEY)})


def train_time(records: list[dict[str, Any]], summary: dict[str, Any], running: bool = False) -> float | None:
    """Training time summed over the run's sessions (a resume starts a new one; summary.json's
    train_runtime_s is the last session's only). Trainer logs each session's running
    `train_runtime`; a session ends with its train_loss record. A running run counts up to now."""
    total, current, last_time, seen = 0.0, 0.0, None, False
    for record in records:
        if record.get(SESSION_START_KEY):  # the session before it ended without an end record (killed)
            total, current = total + current, 0.0
            continue
        runtime = record.get("train_runtime")
        if not isinstance(runtime, (int, float)):
            continue
        seen = True
        if SESSION_END_KEY in record:
            total, current = total + runtime, 0.0
            continue
        if runtime < current:  # a new session began without an end record (its process was killed)
            total += current
        current, last_time = runtime, record.get("time")
    if not seen:
        return summary.get("train_runtime_s")
    if current and running and isinstance(last_time, (int, float)):
        current += max(0.0, time.time() - last_time)  # still going: count up to now
    return total + current


def feedback_keys(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Reward-like and KL-like keys (`reward`, `rewards/chosen`, `kl`, `objective/kl`, ...)."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    reward, kl = [], []
    for key in seen:
        base = key.removeprefix("eval_")
        parts = set(base.replace("/", "_").split("_"))
        if "std" in parts:
            continue
        if parts & {"reward", "rewards"}:
            reward.append(key)
        elif "kl" in parts:
            kl.append(key)
    return reward[:6], kl[:4]


def draw_curves(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Draw <run_dir>/curves.png (or `path`) from metrics.jsonl, atomically; returns the path."""
    run_dir = Path(run_dir)
    out = Path(path) if path is not None else run_dir / CURVES_NAME
    records = read_metrics(run_dir)
    panels = _panels(records)
    fig = _figure(len(panels) or 1)
    axes = fig.axes
    if not panels:
        axes[0].text(0.5, 0.5, "no training metrics logged yet", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    tokens = tokens_label(records)
    resumes = resume_steps(records)
    steps = [s for p in panels for line in p["lines"] for s in line[1]]
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        _draw_panel(ax, panel, resumes)
        pad = max(0.03 * (max(steps) - min(steps)), 0.5)
        ax.set_xlim(min(steps) - pad, max(steps) + pad)  # one x range for every panel
    last = max((r["step"] for r in records), default=0)
    about = ", ".join(p for p in (_task_of(run_dir, records), f"step {last:,}", tokens) if p)
    fig.suptitle(f"{run_dir.resolve().name}: {about}  (updated {time.strftime('%Y-%m-%d %H:%M')})")
    save_png(fig, out)
    return out


def save_png(fig, out: Path) -> None:
    """Write a figure as PNG under a temporary name, then rename it into place."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Panels


def _panels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What to draw: one dict per panel (title, lines, y scale), only for keys that were logged."""
    panels = []
    loss_lines = []
    steps, values = series(records, "loss")
    if len(steps) >= SMOOTH_FROM:
        loss_lines += [("train (raw)", steps, values, "raw"), ("train (smoothed)", steps, smooth(values), "smooth")]
    elif steps:
        loss_lines.append(("train", steps, values, "smooth"))
    steps, values = series(records, "eval_loss")
    if steps:
        loss_lines.append(("eval", steps, values, "eval"))
    if loss_lines:
        panels.append({"title": "loss", "ylabel": "loss", "lines": loss_lines, "log": "auto"})
    steps, values = series(records, "eval_perplexity")
    if steps:
        panels.append({"title": "eval perplexity", "ylabel": "perplexity", "log": "auto",
                       "lines": [("eval perplexity", steps, values, "eval")]})
    clf = [(key.removeprefix("eval_"), *series(records, key), "eval") for key in ("eval_accuracy", "eval_f1")]
    clf = [line for line in clf if line[1]]
    if clf:
        panels.append({"title": "eval accuracy / F1", "ylabel": "score", "lines": clf, "log": False})
    for key, title, log in (("learning_rate", "learning rate", False), ("grad_norm", "grad norm (before clipping)", "auto")):
        steps, values = series(records, key)
        if steps:
            panels.append({"title": title, "ylabel": title.split(" (")[0], "log": log, "lines": [(key, steps, values, "line")]})
    reward, kl = feedback_keys(records)
    for keys, title in ((reward, "reward"), (kl, "KL")):
        lines = [(key, *series(records, key), "eval" if key.startswith("eval_") else "line") for key in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append({"title": title, "ylabel": title, "lines": lines, "log": False})
    return panels


def _figure(n: int):
    from matplotlib.figure import Figure

    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    height = 3.2 * rows + 0.9
    fig = Figure(figsize=(6 * cols, height))
    # fixed margins in inches (constrained layout would double the drawing time)
    fig.subplots_adjust(left=0.08 if cols == 2 else 0.12, right=0.98, wspace=0.22, hspace=0.45,
                        bottom=0.55 / height, top=1 - 0.75 / height)
    fig.subplots(rows, cols, squeeze=False)
    for ax in fig.axes[n:]:
        ax.remove()
    return fig


_STYLES = {
    "raw": {"color": "tab:blue", "alpha": 0.3, "linewidth": 1},
    "smooth": {"color": "tab:blue", "linewidth": 2},
    "eval": {"marker": "o", "markersize": 4, "linewidth": 1.5},
    "line": {"linewidth": 1.5},
}


def _draw_panel(ax, panel: dict[str, Any], resumes: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = []
    for label, steps, ys, style in panel["lines"]:
        kwargs = dict(_STYLES[style])
        if style == "eval" and panel["title"] == "loss":
            kwargs["color"] = "tab:orange"
        ax.plot(steps, ys, label=label, **kwargs)
        values += ys
    log = panel["log"]
    positive = [v for v in values if v > 0]
    if log == "auto":
        log = len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > LOG_RATIO
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))  # plain numbers at 1-2-5
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif panel["title"] == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for step in resumes:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    if resumes and panel["title"] == "loss":
        ax.plot([], [], color="grey", linestyle=":", label="resumed")
    ax.set_title(panel["title"] + (" (log scale)" if log else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(panel["ylabel"])
    ax.grid(True, alpha=0.3)
    if len(panel["lines"]) > 1 or (resumes and panel["title"] == "loss"):
        ax.legend(fontsize="small")


def tokens_label(records: list[dict[str, Any]]) -> str | None:
    """'10.2k tokens seen (256/step)' when tokens were counted (in the title: a second x axis
    would add a third to the drawing time)."""
    steps, tokens = series(records, "num_input_tokens_seen")
    if not steps or tokens[-1] <= 0:
        return None
    rate = f" ({human(tokens[-1] / steps[-1])}/step)" if steps[-1] > 0 else ""
    return f"{human(tokens[-1])} tokens seen{rate}"


def human(value: float) -> str:
    """1234567 -> '1.23M' (tokens, parameters)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def _task_of(run_dir: Path, records: list[dict[str, Any]]) -> str:
    try:
        task = json.loads((run_dir / "summary.json").read_text()).get("task")
        if task:
            return task
    except (OSError, ValueError, AttributeError):
        pass
    if any("eval_perplexity" in r for r in records):
        return "language model"
    if any("eval_accuracy" in r for r in records):
        return "classification"
    return "training"


# --------------------------------------------------------------------------------------------
# The callback (transformers is imported only when it is asked for)


def __getattr__(name: str):
    if name == "CurvesCallback":
        cls = _make_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_callback():
    from transformers import TrainerCallback

    class CurvesCallback(TrainerCallback):
        """Redraw <run dir>/curves.png at evaluations and checkpoint saves during training, and at
        the end (main process only). A drawing takes 0.3-1.5 s of CPU, so one during training is
        skipped when the last was less than `every` seconds ago or drawing has already taken
        `budget` of the training time: a run never slows by more than a few percent, and a run
        shorter than `every` draws only at the end. A failure is one warning, never an error."""

        def __init__(self, run_dir: str | os.PathLike | None = None, every: float = 30.0, budget: float = 0.05):
            self.run_dir = Path(run_dir) if run_dir is not None else None
            self.every, self.budget = every, budget
            self.warned = False
            self.seconds = 0.0  # time spent drawing so far
            self.draws = 0
            self.ended = False
            self.began = self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = self.last = time.perf_counter()
            self.ended = False

        def redraw(self, args, state, final: bool = False) -> Path | None:
            if not state.is_world_process_zero:
                return None
            now = time.perf_counter()
            self.ended = self.ended or final  # fit() may evaluate once more after training: draw that too
            if not self.ended and (now - self.last < self.every or self.seconds > self.budget * (now - self.began)):
                return None
            self.draws += 1
            try:
                return draw_curves(self.run_dir or args.output_dir)
            except Exception as err:  # a plot must never stop a training run
                if not self.warned:
                    from llmcli import console

                    console.warn(f"could not draw {CURVES_NAME}: {type(err).__name__}: {err}")
                    self.warned = True
                return None
            finally:
                self.last = time.perf_counter()
                self.seconds += self.last - now

        def on_evaluate(self, args, state, control, **kwargs):
            self.redraw(args, state)

        def on_save(self, args, state, control, **kwargs):
            self.redraw(args, state)

        def on_train_end(self, args, state, control, **kwargs):
            self.redraw(args, state, final=True)

    CurvesCallback.__module__ = __name__
    return CurvesCallback
