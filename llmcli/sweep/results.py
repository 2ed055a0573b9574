"""A sweep's results, written by whichever worker finishes a trial or the study: the leaderboard
(leaderboard.jsonl, leaderboard.csv, printed), best.yaml and Optuna's plots in the sweep dir."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from llmcli import console, files, layout
from llmcli.config import load_config
from llmcli.errors import ConfigError
from llmcli.sweep import confirm
from llmcli.sweep.schema import SweepConfig, param_override
from llmcli.train import curves


def report(study, sweep: SweepConfig, sweep_dir: Path, as_json: bool, overrides: list[str]) -> dict[str, Any]:
    rows = _leaderboard(study, sweep, sweep_dir, overrides)
    best = _write_best(study, sweep, sweep_dir, rows)
    if best and sweep.test_file:
        winner = next(r for r in rows if r["trial"] == best["trial"])
        runs = list(winner["confirm"]["run_dirs"].values()) if winner.get("confirm") else [best["run_dir"]]
        best["test"] = winner["test"] = confirm.test_results(sweep, runs)
        if winner["test"] is None:
            del winner["test"]
    _write_rows(rows, sweep, sweep_dir)
    _plots(study, sweep, sweep_dir)
    if as_json:
        print(json.dumps(best or {}, default=files.json_default))
    else:
        _print_leaderboard(rows, sweep)
        if best:
            shown = confirm.mean_std(best["confirm"]) + " over seeds" if best.get("confirm") else fmt(best["value"])
            test = f"; test {best['test']['metric']} {confirm.mean_std(best['test'])}" if best.get("test") else ""
            console.info(f"best: trial {best['trial']} {sweep.metric} {shown}{test}; config {best['config']}")
    return best or {}


def _leaderboard(study, sweep: SweepConfig, sweep_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """Confirmed trials first, by their mean over seeds; then the others by state and value."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 2, TrialState.FAIL: 3}
    sign = -1 if sweep.direction == "maximize" else 1
    confirmed = confirm.confirmed(study, sweep, overrides, sweep_dir)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]

    def rank(t):
        mean = (confirmed.get(t.number) or {}).get("mean")
        return (mean is None, sign * mean if mean is not None else 0.0, order.get(t.state, 4),
                sign * t.value if t.value is not None else math.inf, t.number)

    trials.sort(key=rank)
    baseline = (study.user_attrs.get("sweep") or {}).get("baseline") is not None
    rows = []
    for rank, t in enumerate(trials, 1):
        run_dir = confirm.trial_dir(sweep_dir, t)  # this worker's view of the shared sweep dir
        summary = layout.read_summary(run_dir) or {}
        runtime = curves.train_time(curves.read_metrics(run_dir), summary) if run_dir.is_dir() else None
        note = t.user_attrs.get("error", "")
        if t.state == TrialState.PRUNED:
            note = f"pruned at evaluation {t.user_attrs.get('pruned_at_eval', '?')}"
        elif t.state == TrialState.RUNNING:
            note = f"running in pid {t.user_attrs.get('worker_pid', '?')} on {t.user_attrs.get('worker_host', '?')}"
        elif summary.get("resumed_from") is not None:
            note = f"resumed from step {summary['resumed_from']}"
        if baseline and t.number == 0:
            note = "; ".join(filter(None, ["the base config", note]))
        row = {"rank": rank, "trial": t.number, "state": t.state.name, sweep.metric: t.value, "params": dict(t.params),
               "global_step": summary.get("global_step"), "train_runtime_s": runtime,
               "run_dir": str(run_dir) if run_dir.is_dir() else "", "note": note}
        if t.number in confirmed:
            row["confirm"] = confirmed[t.number]
        rows.append(row)
    return rows


def write_tables(study, sweep: SweepConfig, sweep_dir: Path, overrides: list[str]) -> None:
    _write_rows(_leaderboard(study, sweep, sweep_dir, overrides), sweep, sweep_dir)


def _write_rows(rows: list[dict[str, Any]], sweep: SweepConfig, sweep_dir: Path) -> None:
    """leaderboard.jsonl and leaderboard.csv, each replaced atomically."""
    files.atomic_write_text(sweep_dir / "leaderboard.jsonl", "".join(json.dumps(r, default=files.json_default) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = [f"{sweep.metric}_mean", f"{sweep.metric}_std", "seeds"] if sweep.confirm else []
    extra += ["test_metric", "test_mean", "test_std"] if sweep.test_file else []
    writer.writerow(["rank", "trial", "state", sweep.metric, *sweep.search, *extra, "global_step", "train_runtime_s", "run_dir", "note"])
    for r in rows:
        c, te = r.get("confirm") or {}, r.get("test") or {}
        cells = [c.get("mean"), c.get("std"), c.get("n")] if sweep.confirm else []
        cells += [te.get("metric"), te.get("mean"), te.get("std")] if sweep.test_file else []
        writer.writerow([r["rank"], r["trial"], r["state"], r[sweep.metric], *(r["params"].get(k) for k in sweep.search),
                         *cells, r["global_step"], r["train_runtime_s"], r["run_dir"], r["note"]])
    files.atomic_write_text(sweep_dir / "leaderboard.csv", buf.getvalue())


def _write_best(study, sweep: SweepConfig, sweep_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """best.yaml: the winning trial's resolved config (the best mean over seeds when confirmed), with
    output_dir moved to <sweep>/best so that `llmcli <command> --config best.yaml` trains it afresh
    rather than resuming the trial's own dir."""
    from llmcli.config import dump_resolved

    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial yet
        console.warn("no trial has completed: no best.yaml")
        return None
    top = rows[0] if rows and rows[0].get("confirm") else None
    if top is not None:
        best = next(t for t in study.get_trials(deepcopy=False) if t.number == top["trial"])
        pending = sum(len(r["confirm"]["pending"]) for r in rows if r.get("confirm"))
        if pending:
            console.warn(f"{pending} confirm run(s) not finished yet: best.yaml is the best mean so far")
    run_dir = confirm.trial_dir(sweep_dir, best)
    path = sweep_dir / "best.yaml"
    try:
        cfg = load_config(run_dir / "config.yaml", [param_override("training.output_dir", str(sweep_dir / "best"))])
    except ConfigError as err:  # e.g. the trial ran on another machine whose sweep dir is not shared
        console.warn(f"best.yaml not written: {err}")
    else:
        value = f"{sweep.metric} {best.value}" + (f"; over seeds {confirm.mean_std(top['confirm'])}" if top else "")
        dump_resolved(cfg, path, {"best trial": f"{best.number} of {sweep_dir} ({value})",
                                  "trial run dir": str(run_dir), "run": f"llmcli {sweep.command} --config {path}"})
    return {"trial": best.number, "metric": sweep.metric, "value": best.value, "direction": sweep.direction,
            "params": dict(best.params), "run_dir": str(run_dir), "config": str(path), "study": study.study_name,
            **({"confirm": top["confirm"]} if top else {})}


def _plots(study, sweep: SweepConfig, sweep_dir: Path) -> None:
    """PNG plots with optuna.visualization.matplotlib; a plot Optuna cannot draw is skipped with a warning."""
    import warnings

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except ImportError:
        console.warn("plots skipped: they need matplotlib (pip install 'llmcli[plot]')")
        return

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return
    # a parameter with one value among the completed trials gives an empty contour and no importance
    varying = [k for k in sweep.search if len({repr(t.params.get(k)) for t in complete}) >= 2]
    jobs = {"optimization_history.png": lambda: vis.plot_optimization_history(study, target_name=sweep.metric)}
    top = varying[:2]
    if len(varying) >= 2 and len(complete) >= 3:
        try:
            top = [k for k in optuna.importance.get_param_importances(study, params=varying)][:2]
            jobs["param_importances.png"] = lambda: vis.plot_param_importances(study, params=varying, target_name=sweep.metric)
        except Exception as err:
            console.warn(f"param_importances.png skipped: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    elif len(sweep.search) >= 2:
        console.warn("param_importances.png skipped: it needs 3 completed trials and 2 parameters that vary among them")
    if len(top) == 2:
        jobs["contour.png"] = lambda: vis.plot_contour(study, params=top, target_name=sweep.metric)
    elif len(sweep.search) >= 2:
        console.warn("contour.png skipped: it needs 2 parameters that vary among the completed trials")
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its own warnings repeat what is said here
    for name, draw in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 6)
            tmp = sweep_dir / f".{name}.{os.getpid()}.tmp"
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            os.replace(tmp, sweep_dir / name)
            plt.close(fig)
        except Exception as err:
            console.warn(f"{name} skipped: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    optuna.logging.set_verbosity(previous)


def _print_leaderboard(rows: list[dict[str, Any]], sweep: SweepConfig) -> None:
    if console.quiet():
        return
    import sys

    extra = ["mean ± std (seeds)"] if sweep.confirm else []
    extra += [f"test {sweep.test_metric or confirm.test_metric_of(sweep.metric)}"] if sweep.test_file else []
    header = ["rank", "trial", "state", sweep.metric, *(k.rsplit(".", 1)[-1] for k in sweep.search), *extra, "steps", "note"]
    body = [[str(r["rank"]), str(r["trial"]), r["state"].lower(), fmt(r[sweep.metric]),
             *(fmt(r["params"].get(k)) for k in sweep.search),
             *([confirm.mean_std(r.get("confirm"))] if sweep.confirm else []),
             *([confirm.mean_std(r.get("test"))] if sweep.test_file else []),
             fmt(r["global_step"]), r["note"][:60]] for r in rows]
    title = f"sweep leaderboard ({sweep.direction} {sweep.metric})"
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("state", "note") else "right")
        for line in body:
            table.add_row(*line)
        Console().print(table)
        return
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    print(title)
    for line in [header, *body]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    sys.stdout.flush()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return console.format_value(value)
