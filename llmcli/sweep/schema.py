"""The sweep file's schema (`llmcli sweep --config`): a search space over keys of one base config,
checked against that config before any trial runs. Each trial's own config is a `config.Config`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from llmcli.config import Config, Section, load_config, read_yaml, suggest
from llmcli.errors import ConfigError, DataError
from llmcli.tasks import FEEDBACK_TASKS, spec


class SearchParam(Section):
    """One dimension of a sweep's search space (Optuna's suggest_float / suggest_int / suggest_categorical)."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical.")
    low: float | None = Field(None, description="float/int: smallest value.")
    high: float | None = Field(None, description="float/int: largest value (inclusive).")
    log: bool = Field(False, description="float/int: sample on a log scale (low > 0).")
    step: float | None = Field(None, gt=0, description="float/int: grid step (int default 1; a float range needs it under the grid sampler).")
    choices: list[Any] | None = Field(None, description="categorical: the values (null, bool, int, float or str).")


class ConfirmSection(Section):
    """Re-run the best trials with more seeds before one is called the best."""

    top_k: int = Field(3, ge=1, description="How many of the best completed trials are re-run.")
    seeds: list[int] = Field(min_length=1, description="training.seed of each re-run; a trial's own seed reuses its run. The leaderboard ranks these trials by the mean over the seeds (± sample std).")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat a value: {seeds}")
        return seeds


class SweepConfig(Section):
    base: str = Field(description="The base config file of every trial (relative to the current directory).")
    command: Literal["finetune", "pretrain"] = Field(description="The command every trial runs.")
    metric: str = Field("eval_loss", description="The summary/evaluation metric to optimise (eval_accuracy, eval_loss, ...); for task reward, dpo or rl the default is the task's main metric (maximized).")
    direction: Literal["maximize", "minimize"] = Field("minimize", description="maximize or minimize the metric.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted config key -> value: changes to the base config of every trial (before --set).")
    search: dict[str, SearchParam] = Field(description="Dotted config key -> its search space.")
    n_trials: int | None = Field(None, ge=1, description="Trials in the whole study, all workers together (grid: default the grid's size).")
    timeout: float | None = Field(None, gt=0, description="Seconds after which this worker starts no new trial (a running one finishes).")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = Field("median", description="median: stop a trial whose evaluation is worse than the median of earlier trials at the same evaluation; successive_halving / hyperband: Optuna's (asynchronous) successive halving and Hyperband over evaluations.")
    pruner_startup_trials: int = Field(2, ge=0, description="median pruner: finished trials needed before any trial is pruned.")
    pruner_warmup_evals: int = Field(0, ge=0, description="Evaluations a trial always gets before it can be pruned (successive_halving / hyperband: their minimum resource).")
    baseline: bool = Field(True, description="Trial 0 runs the base config's own values of the searched keys, when it sets them all inside the search space: the leaderboard shows whether the search beat it, and the pruner has a finished reference. false: trial 0 is sampled.")
    confirm: ConfirmSection | None = Field(None, description="After the search: re-run the top_k trials with each of seeds; best.yaml is the best mean.")
    test_file: str | None = Field(None, description="A held-out file (the evaluation file's format) on which the winner's run(s) are evaluated with `llmcli eval` at the end; trials are selected on the base config's validation data only.")
    test_metric: str | None = Field(None, description="The `llmcli eval` metric reported on test_file (default: metric without 'eval_'; eval_loss -> nll).")
    seed: int | None = Field(None, description="Sampler seed (trial N samples with seed + N): the same seed gives the same trials.")
    output_dir: str | None = Field(None, description="The sweep dir (trial-NNNN/ run dirs, study.db, leaderboard, best.yaml, plots).")
    storage: str | None = Field(None, description="Optuna RDB URL (default sqlite:///<output_dir>/study.db); share it to run several workers.")
    study_name: str | None = Field(None, description="Study name in the storage (default: the sweep dir's name).")

    def base_overrides(self, sets: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The overrides of every trial's base config: the file's `overrides:`, then `--set`."""
        return [param_override(k, v) for k, v in self.overrides.items()] + list(sets)

    def grid(self) -> dict[str, list]:
        """The grid sampler's points per key: the choices, or low..high by step."""
        out = {}
        for key, s in self.search.items():
            if s.type == "categorical":
                out[key] = list(s.choices)
            elif s.type == "int":
                out[key] = list(range(int(s.low), int(s.high) + 1, int(s.step or 1)))
            else:
                n = int(math.floor((s.high - s.low) / s.step + 1e-9)) + 1
                out[key] = [round(s.low + i * s.step, 12) for i in range(n)]
        return out

    def baseline_params(self, overrides: list[str]) -> tuple[dict[str, Any] | None, str]:
        """The base config's values of the searched keys (with every trial's `overrides`), each as the
        search space spells it, or None and why not: a key the base config leaves unset, or a value
        outside the space. A choice matches when a trial given it gets the base value: YAML reads
        `1e-4` as a string, which a trial's config turns into the number."""
        if not self.baseline:
            return None, "baseline: false"

        def value_at(cfg: Config, key: str) -> tuple[bool, Any]:
            node: Any = cfg.model_dump(mode="json")
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return False, None
                node = node[part]
            return True, node

        def matches(key: str, point: Any, value: Any) -> bool:
            if _same_value(point, value):
                return True
            return isinstance(point, str) and not isinstance(value, str) and _same_value(
                value_at(load_config(self.base, [*overrides, param_override(key, point)]), key)[1], value)

        base, grid = load_config(self.base, overrides), self.grid() if self.sampler == "grid" else {}
        params = {}
        for key, space in self.search.items():
            found, value = value_at(base, key)
            points = grid.get(key) or space.choices
            if not found:
                match = []
            elif points is not None:
                match = [p for p in points if matches(key, p, value)]
            else:
                match = [int(value) if space.type == "int" else float(value)] if _in_range(space, value) else []
            if not match:  # an absent key reads as None: not set
                return None, f"the base config does not set {key}" if value is None else \
                    f"the base config's {key}={value!r} is outside the search space"
            params[key] = match[0]
        return params, ""


def move_to_front(points: list[tuple], names: list[str], first: dict[str, Any]) -> bool:
    """Move the grid point equal to `first` (name -> value) to the front, the others keeping their order
    (GridSampler's seeded shuffle: trial N gets point N). False if no point equals it."""
    at = [i for i, point in enumerate(points) if all(_same_value(v, first.get(n)) for v, n in zip(point, names))]
    if at:
        points.insert(0, points.pop(at[0]))
    return bool(at)


def _in_range(space: SearchParam, value: Any) -> bool:
    """A number within low..high, on the step (if any); an integer for type int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not space.low <= value <= space.high:
        return False
    if space.type == "int" and value != int(value):
        return False
    steps = (value - space.low) / space.step if space.step else 0.0
    return abs(steps - round(steps)) < 1e-9


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: 1e-4 == 0.0001 and 32 == 32.0, but True is not 1 and "1" is not 1."""
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return type(a) is type(b) and a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def load_sweep_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and validate a sweep file. `overrides` are the `--set` overrides of every trial's base
    config (applied after the file's own `overrides:`). The base config is
    loaded with them, and with each search key set to each end point or choice, so an unknown key or
    a value of the wrong type fails here, before any trial runs. Raises ConfigError (exit 2)."""
    if path is None:
        raise ConfigError("llmcli sweep needs --config SWEEP.yaml")
    raw = read_yaml(Path(path))
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_format_sweep_error(err)}") from None
    if not sweep.search:
        raise ConfigError(f"{path}: 'search' is empty: name at least one config key to search")
    for key, space in sweep.search.items():
        problem = _space_problem(space, sweep.sampler)
        if problem:
            raise ConfigError(f"{path}: search '{key}': {problem}")
    if sweep.n_trials is None and sweep.timeout is None and sweep.sampler != "grid":
        raise ConfigError(f"{path}: set n_trials (or timeout) for the {sweep.sampler} sampler")
    if sweep.test_file and not Path(sweep.test_file).is_file():
        raise DataError(f"{path}: test_file {sweep.test_file}: no such file")
    overrides = sweep.base_overrides(overrides)
    try:
        base = load_config(sweep.base, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: base config: {err}") from None
    if base.task in FEEDBACK_TASKS and "metric" not in sweep.model_fields_set:
        # a feedback run's main number is its task's (held-out reward after rl, DPO's reward accuracy), not eval_loss
        sweep.metric = spec(base.task).main_metric
        if "direction" not in sweep.model_fields_set:
            sweep.direction = "maximize"
    for key, space in sweep.search.items():
        samples = space.choices if space.type == "categorical" else [space.low, space.high]
        for value in samples:
            value = int(value) if space.type == "int" else value
            try:
                load_config(sweep.base, [*overrides, param_override(key, value)])
            except ConfigError as err:
                raise ConfigError(f"{path}: search '{key}' = {value!r}: {err}") from None
    return sweep


def param_override(key: str, value: Any) -> str:
    """`key=value` with the value as a YAML scalar that `--set` reads back unchanged (1e-05 -> 1.0e-05)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _space_problem(space: SearchParam, sampler: str) -> str | None:
    if space.type == "categorical":
        if not space.choices:
            return "type categorical needs a non-empty 'choices' list"
        bad = [c for c in space.choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            return f"choices must be null, bool, int, float or str, got {bad[0]!r}"
        extra = [k for k in ("low", "high", "step") if getattr(space, k) is not None] + (["log"] if space.log else [])
        return f"'{extra[0]}' does not apply to type categorical" if extra else None
    if space.choices is not None:
        return f"'choices' applies to type categorical, not {space.type}"
    if space.low is None or space.high is None:
        return f"type {space.type} needs 'low' and 'high'"
    if space.low > space.high:
        return f"low {space.low:g} > high {space.high:g}"
    if space.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(space, name)
            if value is not None and value != int(value):
                return f"type int needs an integer '{name}', got {value:g}"
    if space.log and space.low <= 0:
        return f"log: true needs low > 0, got {space.low:g}"
    if space.log and space.step is not None and not (space.type == "int" and space.step == 1):
        return "'log' and 'step' cannot be combined"
    if sampler == "grid" and space.type == "float" and space.step is None:
        return "the grid sampler needs a 'step' for a float range (or use type categorical)"
    return None


def _format_sweep_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        if len(loc) >= 3 and loc[0] == "search":  # search.<key>.<field>
            return f"unknown key '{loc[-1]}' in search '{loc[1]}'{suggest(loc[-1], SearchParam.model_fields)}{more}"
        fields = ConfirmSection.model_fields if loc[0] == "confirm" else SweepConfig.model_fields
        return f"unknown sweep key '{'.'.join(loc)}'{suggest(loc[-1], fields)}{more}"
    where = f"search '{loc[1]}' key '{'.'.join(loc[2:])}'" if len(loc) >= 3 and loc[0] == "search" else f"sweep key '{'.'.join(loc)}'"
    if first["type"] == "missing":
        return f"{where} is required{more}"
    return f"{where}: {first['msg']}, got {first.get('input')!r}{more}"
