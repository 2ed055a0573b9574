"""`llmcli sweep`: a hyper-parameter search in which every trial is an ordinary, resumable run.

    llmcli sweep --config configs/sweep-sst2-minilm.yaml --set model.model_name_or_path="$(python scripts/minilm_path.py)"
    llmcli sweep --config sweep.yaml --storage postgresql://host/db    # the same command on each machine: one study

The state is an Optuna study in a database (`<sweep>/study.db`, or any `--storage` URL): trial
numbers, parameters, reported evaluations and outcomes. Each trial `N` is the run dir
`<sweep>/trial-NNNN/`, produced by `llmcli.train.<command>.run` (the code path of `llmcli finetune` /
`pretrain`), with the trial's parameters applied as `--set` overrides on the base config. A
TrainerCallback reports the metric at each evaluation and stops a trial the pruner rejects.

Rules that make it reboot-safe and multi-worker:
- A trial records its worker (host, boot id, pid) and a heartbeat as user attributes. A RUNNING
  trial whose worker is gone (same host: its trial dir's run lock is no longer held, or before the
  lock exists its pid is dead or the machine rebooted; another host: no heartbeat for STALE_AFTER_S)
  is put back to WAITING, except while a worker that just re-attached it is starting its run;
  `study.ask()` claims WAITING trials atomically (Optuna's own trial queue), so exactly one worker
  re-attaches it, with its number and parameters, and its run resumes from the newest checkpoint.
- The sweep dir has no lock of its own, since several workers share it: each trial dir is locked by
  its run (`.llmcli.lock`), and the sweep-level files are replaced atomically by whoever writes last.
- `n_trials` counts COMPLETE, PRUNED, RUNNING and WAITING trials and diverged (NaN-loss) failures, over
  all workers; a trial created past it by a racing worker is marked FAIL ("surplus") and not run.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from llmcli import console, files, layout
from llmcli.config import load_config, suggest
from llmcli.errors import ConfigError, Interrupted, LlmcliError, LockedError, TrainingFailed, first_line
from llmcli.sweep.results import fmt, report, write_tables
from llmcli.sweep.schema import SweepConfig, param_override
from llmcli.sweep import confirm
from llmcli.sweep import study as studies
from llmcli.sweep.study import counted
from llmcli.train import rundir

WAIT_S = 5  # how often a worker waiting for other workers' trials looks again
HEARTBEAT_S = 60  # a running trial refreshes its heartbeat this often
STALE_AFTER_S = 300  # a trial of another host with no heartbeat for this long is taken over
CLAIM_GRACE_S = 60  # from a worker's claim of a trial to its run taking the trial dir's lock (seconds, at most)


def run(sweep: SweepConfig, overrides: list[str] | tuple[str, ...] = (), output_dir: str | None = None,
        storage: str | None = None, as_json: bool = False) -> dict[str, Any]:
    """Run trials until the study holds `n_trials` (or `timeout` passes), then write the reports.
    Returns the best trial as a dict (printed with `--json`)."""
    if not console.debug():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir, overrides = _checked(sweep, overrides, output_dir)
    console.summaries_to_stderr()  # stdout holds the leaderboard (or --json) alone: `llmcli sweep > board.txt`
    files.ensure_writable_dir(sweep_dir)
    study = studies.open_study(sweep, sweep_dir, storage, list(overrides), sweep.baseline_params(overrides))
    budget = studies.budget(sweep)
    if budget is not None and study.user_attrs.get("budget") != budget:
        study.set_user_attr("budget", budget)  # for `llmcli report`'s progress and --watch
    if study.user_attrs.get("confirm") != (sweep.confirm and sweep.confirm.model_dump()):
        study.set_user_attr("confirm", sweep.confirm and sweep.confirm.model_dump())  # for `llmcli report`
        study.set_user_attr("confirm_done", False)
    command = importlib.import_module(f"llmcli.train.{sweep.command}")
    started = time.time()
    while True:
        _requeue_orphans(study, sweep_dir)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        searching = (sweep.timeout is None or time.time() - started < sweep.timeout) and \
            (budget is None or sum(map(counted, trials)) < budget)
        if not (waiting or searching):
            if sweep.confirm is None or not _confirm_next(study, sweep, list(overrides), sweep_dir, command):
                break
            continue
        trial = study.ask()
        adopted = "worker_host" in trial.user_attrs
        if not adopted and budget is not None:
            ahead = sum(counted(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
            if ahead >= budget:  # another worker took the last slot at the same moment
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                continue
        params = {key: _suggest_param(trial, key, space) for key, space in sweep.search.items()}
        _run_trial(study, trial, params, sweep, list(overrides), sweep_dir, command, f"trial {trial.number}" + (f"/{budget}" if budget else ""))
    return report(study, sweep, sweep_dir, as_json, list(overrides))


def _confirm_next(study, sweep: SweepConfig, overrides: list[str], sweep_dir: Path, command) -> bool:
    """The confirm phase, one step: wait while other workers' search trials run (their results decide
    the top trials), then run one confirm run; False once none is left to run or wait for."""
    if not confirm.search_done(study):
        time.sleep(WAIT_S)
        return True
    claimed = confirm.claim(study, sweep, overrides)
    if claimed is None:
        runs = confirm.confirm_study(study)
        _requeue_orphans(runs, sweep_dir)
        if confirm.search_done(runs):
            study.set_user_attr("confirm_done", True)
            return False
        time.sleep(WAIT_S)  # another worker's confirm run: the leaderboard is final once it is in
        return True
    runs, trial, source = claimed
    seed = trial.user_attrs["seed"]
    _run_trial(runs, trial, dict(source.params), sweep, [*overrides, f"training.seed={seed}"], sweep_dir, command,
               f"confirm trial {source.number} seed {seed}")
    write_tables(study, sweep, sweep_dir, list(overrides))
    return True


def sweep_dir_of(sweep: SweepConfig, output_dir: str | None) -> Path:
    if not (output_dir or sweep.output_dir):
        raise ConfigError("the sweep needs an output dir: set output_dir in the sweep file or pass --output-dir")
    return Path(output_dir or sweep.output_dir)


def _checked(sweep: SweepConfig, overrides, output_dir: str | None) -> tuple[Path, list[str]]:
    """(the sweep dir, every trial's base overrides), after the checks a sweep needs before it starts."""
    sweep_dir = sweep_dir_of(sweep, output_dir)
    overrides = sweep.base_overrides(overrides)
    base = load_config(sweep.base, overrides)
    if base.launch.num_processes > 1 or base.launch.config_file or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a sweep runs each trial in its own process: leave launch.num_processes at 1 and start one `llmcli sweep` per GPU instead")
    if sweep.pruner == "median" and str(base.training.model_dump().get("eval_strategy", "no")) in ("no", "IntervalStrategy.NO"):
        console.warn("the median pruner needs evaluations during training (training.eval_strategy=steps or epoch); no trial will be pruned")
    return sweep_dir, overrides


def dry_run(sweep: SweepConfig, overrides: list[str] | tuple[str, ...] = (), output_dir: str | None = None,
            storage: str | None = None) -> dict[str, Any]:
    """`--dry-run`: the sweep file checked as a run would check it (base config, every search end
    point), printed resolved (stdout) with what would run (stderr); nothing is written or opened."""
    import yaml

    sweep_dir, overrides = _checked(sweep, overrides, output_dir)
    baseline, why = sweep.baseline_params(overrides)
    plan = {
        "command": sweep.command, "base": sweep.base, "metric": f"{sweep.direction} {sweep.metric}",
        "trials": studies.budget(sweep) or f"until {sweep.timeout} s", "sampler": sweep.sampler, "pruner": sweep.pruner,
        "trial 0": ", ".join(f"{k}={fmt(v)}" for k, v in baseline.items()) if baseline else f"sampled ({why})",
        "confirm": f"the top {sweep.confirm.top_k} trials with seeds {sweep.confirm.seeds}" if sweep.confirm else "no",
        "test": f"the winner on {sweep.test_file}" if sweep.test_file else "no test file",
        "sweep dir": str(sweep_dir), "storage": storage or sweep.storage or f"sqlite:///{sweep_dir.resolve() / 'study.db'}",
    }
    print(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False), end="")
    console.table("dry run: no trial was run", list(plan.items()), to_stderr=True)
    return {"dry_run": True, **plan}


def _requeue_orphans(study, sweep_dir: Path) -> None:
    """Put RUNNING trials whose worker is gone back to WAITING, for `study.ask()` to re-attach."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_alive(t, now, sweep_dir):
            continue
        a = t.user_attrs
        console.info(f"trial {t.number} was interrupted (worker pid {a.get('worker_pid', '?')} on {a.get('worker_host', '?')} is gone): it will resume")
        try:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.WAITING)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished meanwhile


def _worker_alive(trial, now: float, sweep_dir: Path | None = None) -> bool:
    """A running trial's worker is alive while it holds its trial dir's run lock (asked of the kernel:
    a recorded pid may be this process's own, pid 1 after a container restart, or reused). Until that
    lock is taken, the run is starting: a trial re-attached since its worker was recorded (started
    after its last heartbeat) waits for its new worker to record itself, as a new trial does; a trial
    claimed by a live pid of this boot has CLAIM_GRACE_S from the claim to take the lock. Before any
    lock file exists: the worker's pid on this boot. Another host's: its heartbeat."""
    a = trial.user_attrs
    started = trial.datetime_start.timestamp()
    if "worker_host" not in a:  # killed between ask() and recording its worker
        return now - started < STALE_AFTER_S
    heartbeat = float(a.get("heartbeat", 0))
    if a["worker_host"] != socket.gethostname():
        return now - heartbeat < STALE_AFTER_S
    held = layout.lock_is_held(confirm.trial_dir(sweep_dir, trial) / layout.LOCK_NAME) if sweep_dir is not None else None
    if held:
        return True
    if heartbeat < started:  # another worker re-attached it a moment ago and is recording itself
        return now - started < STALE_AFTER_S
    pid_lives = a.get("worker_boot") == _boot_id() and a.get("worker_pid") != os.getpid() and layout.pid_alive(int(a["worker_pid"]))
    return pid_lives if held is None else pid_lives and now - heartbeat < CLAIM_GRACE_S


def _finished_summary(run_dir: Path) -> dict | None:
    summary = layout.read_summary(run_dir)
    return None if summary is None or summary.get("status") == "failed" else summary


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# One trial


def _run_trial(study, trial, params: dict[str, Any], sweep: SweepConfig, overrides: list[str], sweep_dir: Path, command,
               title: str) -> None:
    """Run one trial (a search trial, or a confirm run with its seed among `overrides`) and tell the study."""
    previous = dict(trial.user_attrs)
    trial_dir = confirm.trial_dir(sweep_dir, trial)
    _claim(trial, trial_dir)
    adopted = "worker_host" in previous
    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in params.items())
    console.info(f"{title}: {shown} -> {trial_dir}" + (" (resuming)" if adopted else ""))
    pruning = _PruningCallback(trial, sweep.metric)
    try:
        if not adopted and (layout.holds_finished_run(trial_dir) or layout.list_checkpoints(trial_dir)):
            raise ConfigError(f"{trial_dir} holds a run that study '{study.study_name}' does not know: "
                              "the sweep dir belongs to another study; use another --output-dir")
        cfg = load_config(sweep.base, [*overrides, *(param_override(k, v) for k, v in params.items()),
                                       param_override("training.output_dir", str(trial_dir))])
        summary = _finished_summary(trial_dir) if adopted else None  # finished; only its result was not recorded
        if summary is None:
            with _Heartbeat(study, trial._trial_id):
                summary = command.run(cfg, resume=True, overwrite=False, callbacks=(pruning,))
    except (Interrupted, KeyboardInterrupt):
        raise  # checkpoint saved (or not yet started): the trial stays RUNNING and the next run resumes it
    except LockedError as err:
        # another live worker re-attached this trial at the same moment and holds its dir: leave it to that worker
        holder = rundir.RunLock(trial_dir).holder() or {}
        trial.set_user_attr("heartbeat", time.time())  # the holder's identity, host last (see _claim)
        trial.set_user_attr("worker_boot", previous.get("worker_boot") if holder.get("host") != socket.gethostname() else _boot_id())
        trial.set_user_attr("worker_pid", holder.get("pid", previous.get("worker_pid")))
        trial.set_user_attr("worker_host", holder.get("host", previous.get("worker_host")))
        console.warn(f"trial {trial.number}: {err}; leaving it to that worker")
        return
    except TrainingFailed as err:  # these parameters diverged: a result of the search, not a sweep failure
        trial.set_user_attr("diverged", True)
        trial.set_user_attr("error", str(err))
        study.tell(trial, state=TrialState.FAIL)
        console.warn(f"{title} failed: {err}")
        return
    except (LlmcliError, SystemExit) as err:  # bad config or data, common to every trial: stop the sweep
        trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as err:  # this trial failed (out of memory, a crash): retried once with its parameters
        _record_failure(study, trial, params, err)
        if "confirm_of" not in trial.user_attrs:
            write_tables(study, sweep, sweep_dir, overrides)
        return

    value = pruning.value_from(summary)
    if value is None:
        study.tell(trial, state=TrialState.FAIL)
        raise ConfigError(f"metric '{sweep.metric}' is not in trial {trial.number}'s results; they have: "
                          f"{', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))}")
    pruned = pruning.pruned or "pruned_at_eval" in trial.user_attrs
    a = trial.user_attrs
    summary.update(trial=a.get("confirm_of", trial.number), pruned=pruned, **({"confirm_seed": a["seed"]} if "confirm_of" in a else {}))
    files.write_json_atomic(trial_dir / "summary.json", summary)
    if pruned:
        study.tell(trial, state=TrialState.PRUNED)
        console.info(f"trial {trial.number} pruned at evaluation {trial.user_attrs['pruned_at_eval']} ({sweep.metric} {fmt(value)})")
    else:
        study.tell(trial, value)
        console.info(f"{title} finished: {sweep.metric} {fmt(value)}")
    if "confirm_of" not in trial.user_attrs:
        write_tables(study, sweep, sweep_dir, overrides)


def _record_failure(study, trial, params: dict[str, Any], err: Exception) -> None:
    """A failed trial: the first time, queue its parameters again (Optuna's enqueue_trial: the next
    trial any worker asks for); a failed retry gives up on them, and that failure counts towards
    n_trials, so a grid does not run a point twice or another point in its place."""
    retry_of = trial.user_attrs.get("retry_of")
    trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
    if "confirm_of" in trial.user_attrs:  # `confirm.needed` queues it once more
        console.warn(f"confirm run {trial.user_attrs['seed']} of trial {trial.user_attrs['confirm_of']} failed ({type(err).__name__}: {first_line(err)})")
    elif retry_of is None:
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        console.warn(f"trial {trial.number} failed ({type(err).__name__}: {first_line(err)}); its parameters run once more")
    else:
        trial.set_user_attr("gave_up", True)
        console.warn(f"trial {trial.number} (a retry of trial {retry_of}) failed again ({type(err).__name__}: "
                     f"{first_line(err)}); recorded as failed, the sweep goes on")
    study.tell(trial, state=TrialState.FAIL)


def _suggest_param(trial, key: str, s):
    if s.type == "categorical":
        return trial.suggest_categorical(key, s.choices)
    if s.type == "int":
        return trial.suggest_int(key, int(s.low), int(s.high), step=int(s.step or 1), log=s.log)
    return trial.suggest_float(key, s.low, s.high, step=s.step, log=s.log)


def _claim(trial, trial_dir: Path) -> None:
    """Record this worker on the trial. Attributes are stored one at a time and other workers read
    them meanwhile, so worker_host, which `_worker_alive` and a rerun look for, comes last: whoever
    sees it sees the pid and heartbeat too."""
    for key, value in (("heartbeat", time.time()), ("run_dir", str(trial_dir)), ("worker_boot", _boot_id()),
                       ("worker_pid", os.getpid()), ("worker_host", socket.gethostname())):
        trial.set_user_attr(key, value)


class _Heartbeat:
    """Refresh the trial's heartbeat attribute every HEARTBEAT_S from a daemon thread (trainer steps,
    evaluations and data loading all take unknown time, so the main thread cannot promise it)."""

    def __init__(self, study, trial_id: int):
        self.storage, self.trial_id = study._storage, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # a busy database misses one beat; the next one follows
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class _PruningCallback(TrainerCallback):
    """Report the metric to the study at each evaluation; stop training when the pruner says so.

    The step reported is the evaluation's ordinal (1, 2, ...), so trials with different batch sizes
    or lengths are compared at the same point of their own schedule (see `training.eval_steps`
    as a fraction of the run)."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned = self.ended = False

    def on_train_end(self, args, state, control, **kwargs):
        # what `fit` evaluates afterwards (the best model, with load_best_model_at_end) is no new point of
        # the schedule: reported, it made every curve one evaluation too long
        self.ended = True

    def value_from(self, metrics: dict[str, Any]) -> float | None:
        if self.metric in metrics and isinstance(metrics[self.metric], (int, float)):
            return float(metrics[self.metric])
        if self.metric == "perplexity" and "eval_loss" in metrics:
            return math.exp(min(metrics["eval_loss"], 700.0))
        return None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.ended:
            return
        value = self.value_from(metrics or {})
        if value is None:
            if self.metric.startswith("eval_"):
                have = sorted(k for k in metrics or {} if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")))
                raise ConfigError(f"metric '{self.metric}' is not among the evaluation results ({', '.join(have)}){suggest(self.metric, have)}")
            return
        key = self.metric if self.metric in (metrics or {}) else "eval_loss"
        step = sum(1 for entry in state.log_history if key in entry)  # this evaluation is logged already
        if step not in self.trial.storage.get_trial(self.trial._trial_id).intermediate_values:
            self.trial.report(value, step)  # a resumed trial re-evaluates nothing it reported before its checkpoint
        if state.global_step < state.max_steps and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_eval", step)
            self.pruned = True
            control.should_training_stop = True
