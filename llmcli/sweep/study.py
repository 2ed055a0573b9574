"""The Optuna study behind a sweep: created or joined in its database, with the sweep's sampler
(seeded per trial; the base config's point first) and pruner, and the sweep's identity stored in it
so that a different sweep never adds trials to it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler, GridSampler
from optuna.trial import TrialState

from llmcli import console
from llmcli.errors import ConfigError
from llmcli.sweep.results import fmt
from llmcli.sweep.schema import SweepConfig, move_to_front


def make_pruner(sweep: SweepConfig):
    """The sweep file's pruner. Trials report evaluation 1, 2, ..., so an evaluation is the resource
    that successive halving and Hyperband allot: `pruner_warmup_evals + 1` is their smallest rung."""
    if sweep.pruner == "median":
        return median_pruner(sweep.pruner_startup_trials, sweep.pruner_warmup_evals)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.pruner_warmup_evals + 1)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sweep.pruner_warmup_evals + 1)
    return optuna.pruners.NopPruner()


def median_pruner(startup_trials: int, warmup_evals: int):
    """Optuna's median pruner as the sweep file means it. Trials report evaluation 1, 2, ... and Optuna
    may prune at any step >= n_warmup_steps, so sparing the first `warmup_evals` takes warmup_evals + 1."""
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_evals + 1)


def open_study(sweep: SweepConfig, sweep_dir: Path, storage: str | None, overrides: list[str],
                baseline: tuple[dict[str, Any] | None, str] = (None, "")):
    """Create or join the study. `baseline` (`SweepConfig.baseline_params`) decides trial 0 of a new
    study; a study keeps the decision it was created with, so every worker and rerun samples alike."""
    url = storage or sweep.storage or f"sqlite:///{sweep_dir.resolve() / 'study.db'}"
    rdb = _rdb_storage(url)
    name = sweep.study_name or sweep_dir.resolve().name
    pruner = make_pruner(sweep)
    try:
        study = optuna.create_study(storage=rdb, study_name=name, direction=sweep.direction, sampler=_sampler(sweep, baseline[0]),
                                    pruner=pruner, load_if_exists=True)
    except ValueError as err:
        raise ConfigError(f"study '{name}' in {url}: {err}") from None
    # the search definition is kept in the study: a different sweep must not add trials to it
    identity = {"base": sweep.base, "command": sweep.command, "metric": sweep.metric, "direction": sweep.direction,
                "search": {k: v.model_dump() for k, v in sweep.search.items()}, "overrides": overrides, "baseline": baseline[0]}
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", identity)
        if baseline[0] is not None:
            console.info("trial 0 runs the base config's values: " + ", ".join(f"{k}={fmt(v)}" for k, v in baseline[0].items()))
        elif sweep.baseline:
            console.info(f"trial 0 is sampled: {baseline[1]}")
    else:
        # a study with no result yet (its trials failed before any evaluation, say on a misspelt metric)
        # takes the corrected sweep; one with results belongs to the sweep that made them
        learned = any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or t.intermediate_values
                      for t in study.get_trials(deepcopy=False))
        for key in ("command", "metric", "direction", "search", "base"):
            before, now = stored.get(key), identity[key]
            if before != now:
                if key == "search":  # name the first search key that differs
                    key = next(f"search.{k}" for k in {**before, **now} if before.get(k) != now.get(k))
                    before, now = before.get(key[7:]), now.get(key[7:])
                if not learned:
                    console.warn(f"study '{name}' has no result yet: it now runs this sweep ('{key}' was {before!r}, now {now!r})")
                    study.set_user_attr("sweep", identity)
                    stored = identity
                    break
                raise ConfigError(f"study '{name}' in {url} was made by a different sweep ('{key}' was {before!r}, now {now!r}); "
                                  "use another --output-dir or study_name")
        if stored.get("overrides") != overrides:
            console.warn(f"the base-config overrides differ from the ones this study started with: {stored.get('overrides')} -> {overrides}")
        if stored.get("baseline") != baseline[0]:  # trial 0 was decided when the study was created
            if stored.get("baseline") is None and baseline[0] is not None:
                console.info("this study was created without a baseline: its trial 0 was sampled")
            study.sampler = _sampler(sweep, stored.get("baseline"))
    done = sum(map(counted, study.get_trials(deepcopy=False)))
    console.info(f"study '{name}' in {url}: {done} trial(s) so far")
    return study


def _rdb_storage(url: str):
    """Optuna's RDBStorage; workers starting together on a new database race to create its tables
    (one gets an IntegrityError on alembic_version), so a failed first connection is retried."""
    import random

    from sqlalchemy.exc import IntegrityError, OperationalError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for SQLite's write lock
    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
            if url.startswith("sqlite"):
                _immediate_transactions(storage.engine)
            return storage
        except (IntegrityError, OperationalError) as err:
            if attempt == 5 or (isinstance(err, OperationalError) and "locked" not in str(err) and "exists" not in str(err)):
                failure = err
                break
            time.sleep(0.2 + random.random() * (attempt + 1))
        except Exception as err:  # a bad URL, a missing driver, an unreachable server
            failure = err
            break
    first = (str(failure).strip().splitlines() or [""])[0]
    raise ConfigError(f"--storage {url}: {type(failure).__name__}: {first}")


def _immediate_transactions(engine) -> None:
    """Every SQLite transaction starts with BEGIN IMMEDIATE (it takes the database's write lock at once).
    Optuna claims a WAITING trial with SELECT ... FOR UPDATE and then an UPDATE; SQLite ignores FOR
    UPDATE, so two workers could both read the trial WAITING and both run it. Holding the write lock
    from the read on makes the claim one step. (SQLAlchemy's recipe for pysqlite: the driver's own
    implicit BEGIN is switched off so that this one is the only one.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (schema checks) are not reused


def budget(sweep: SweepConfig) -> int | None:
    if sweep.sampler != "grid":
        return sweep.n_trials
    size = math.prod(len(v) for v in sweep.grid().values())
    if sweep.n_trials is not None and sweep.n_trials > size:
        console.info(f"the grid has {size} points: running {size} trials, not {sweep.n_trials}")
    return min(size, sweep.n_trials or size)


def _sampler(sweep: SweepConfig, first: dict[str, Any] | None):
    """The sweep's sampler; `first` (the base config's point, or None) is trial 0's parameters."""
    if sweep.sampler == "grid":  # a fixed shuffle of the grid: trial N gets point N in every worker

        def grid(seed):
            sampler = optuna.samplers.GridSampler(sweep.grid(), seed=seed)
            if first is not None and not move_to_front(sampler._all_grids, sampler._param_names, first):
                console.warn("the study's baseline point is not on this grid: trial 0 takes the grid's first point")
            return sampler

        return _Sampler(grid, sweep.seed or 0, per_trial=False)
    make = optuna.samplers.TPESampler if sweep.sampler == "tpe" else optuna.samplers.RandomSampler
    return _Sampler(lambda seed: make(seed=seed), sweep.seed, per_trial=sweep.seed is not None, first=first)


def counted(t) -> bool:
    """Whether a trial takes one of the n_trials: not a failure that was queued again (its retry counts)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return t.state == TrialState.FAIL and bool(t.user_attrs.get("diverged") or t.user_attrs.get("gave_up"))


class _Sampler(BaseSampler):
    """Wraps the chosen Optuna sampler. With a seed, trial N samples with seed + N, so workers sharing a
    study never draw the same sequence and a rerun draws the same trials. GridSampler's after_trial
    (which stops an optimize() loop this sweep does not use) is not called. With `first` (tpe, random),
    trial 0 takes those parameters: the base config's point; the grid sampler moves it to the front instead."""

    def __init__(self, make, seed: int | None, per_trial: bool, first: dict[str, Any] | None = None):
        self._make, self._seed, self._per_trial, self._first = make, seed, per_trial, first or {}
        self._inner = make(seed)

    def before_trial(self, study, trial):
        if self._per_trial:
            self._inner = self._make(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return {} if trial.number == 0 and self._first else self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number == 0 and param_name in self._first:
            return self._first[param_name]
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        if not isinstance(self._inner, GridSampler):
            self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self._inner.reseed_rng()
