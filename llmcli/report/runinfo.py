"""What a run dir says, read from its files alone (never torch): status, step, model, size, tokens,
training time and metrics. `llmcli report` tabulates it; a `--quiet` run ends with its `final_line`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from llmcli import layout, tasks
from llmcli.train import curves

STATUSES = ("finished", "pruned", "running", "interrupted", "failed")
_EVAL_NOISE = ("_runtime", "_samples_per_second", "_steps_per_second", "_per_class", "confusion_matrix")


# --------------------------------------------------------------------------------------------
# One run


def inspect_run(path: str | os.PathLike) -> dict[str, Any]:
    """Everything the report shows about one run dir, from its files (a JSON-ready dict)."""
    path = Path(path)
    records = curves.read_metrics(path)
    summary = _read_json(path / "summary.json") or {}
    if not isinstance(summary.get("global_step"), (int, type(None))) or isinstance(summary.get("global_step"), bool):
        summary.pop("global_step")  # a hand-edited or foreign summary.json: its status stands, the logged steps count
    cfg = _read_yaml(path / "config.yaml")
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    lock = _lock_state(path / layout.LOCK_NAME)
    checkpoints = [s for s, p in layout.list_checkpoints(path) if layout.checkpoint_is_complete(p)]
    logged = max((r["step"] for r in records), default=0)

    if lock is not None and lock["live"]:
        status = "running"
    elif summary and (summary.get("global_step") is None and "status" in summary or (summary.get("global_step") or 0) >= logged):
        status = summary["status"] if summary.get("status") in STATUSES else "finished"
        if status == "finished" and summary.get("pruned") is True:
            status = "pruned"  # a sweep's trial its pruner stopped: finished early, by design
    else:
        status = "interrupted"  # no summary, or a later session (a resume) stopped before writing its own
    ended = status in ("finished", "pruned")  # summary.json holds the run's own final numbers
    step = summary.get("global_step") if ended else None
    if step is None:
        step = max([logged, *checkpoints, summary.get("global_step") or 0])

    task = _task(summary, cfg, path, records)
    metric, greater = main_metric(records, summary, training, task)
    final, best, best_step = _metric_values(records, summary if ended else {}, metric, greater)
    tokens = summary.get("train_tokens") if ended else None
    if not tokens:
        tokens = int(_last(records, "num_input_tokens_seen") or 0) or None
    train_time = curves.train_time(records, summary, running=status == "running")
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
        "perplexity": summary.get("perplexity") if ended and "perplexity" in summary else _last(records, "eval_perplexity"),
        "eval": _final_eval(records, summary if ended else {}),
        "updated": max((r.get("time") for r in records if isinstance(r.get("time"), (int, float))), default=None),
    }
    if status == "failed":
        row["error"] = summary.get("error")
    if lock is not None:
        row["lock"] = {k: lock.get(k) for k in ("pid", "host", "started")}
    return row


def main_metric(records: list[dict], summary: dict, training: dict, task: str | None = None) -> tuple[str | None, bool]:
    """(metric name, greater is better): `training.metric_for_best_model` when set, else the task's
    own (`tasks.SPECS`: held-out reward after training for rl, DPO's held-out reward accuracy) when
    the run has it, else eval_accuracy, eval_loss, the training reward (a feedback run still
    training), or the training loss."""
    configured = training.get("metric_for_best_model")
    if configured:
        name = configured if configured.startswith("eval_") else f"eval_{configured}"
        greater = training.get("greater_is_better")
        return name, bool(greater) if greater is not None else not name.endswith("loss")
    keys = set(summary)
    for record in records:
        keys.update(record)
    own = tasks.spec(task).main_metric if task in {t.value for t in tasks.Task} else None
    for name in (own, "eval_accuracy", "eval_loss", "reward", "loss"):
        if name in keys:
            return name, not name.endswith("loss")
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
    places = [path, path / "merged", *[p for _, p in reversed(layout.list_checkpoints(path))]]
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
    places = [path, path / "merged", *[p for _, p in reversed(layout.list_checkpoints(path))]]
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
        return {**holder, "live": True}  # another machine's run: its lock cannot be asked from here
    return {**holder, "live": bool(layout.lock_is_held(path))}


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
