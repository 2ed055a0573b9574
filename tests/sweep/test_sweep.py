"""`llmcli sweep` end to end on a tiny GPT-2: trials are run dirs, kill -9 / SIGTERM resume, two workers, bad spaces.

Workers run as subprocesses; the test callback (tests/hooks.py, HOOK_PAUSE_AT_STEP) pauses a worker's trial after a known
step (checkpoints every 2 steps), so kills and signals land at a known point.
"""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml

from conftest import FIXTURES, ROOT, TINY_GPT2, read_jsonl
from hooks import CALLBACK, hook_env
from llmcli.config import _set_dotted, parse_override
from llmcli.sweep.schema import load_sweep_config

MAX_STEPS = 6


def write_sweep(tmp_path, **changes):
    """A base config (tiny GPT-2, 6 steps, evaluation and checkpoint every 2) and a 3-trial sweep over it."""
    raw = {}
    for item in [*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", f"training.max_steps={MAX_STEPS}",
                 "training.eval_strategy=steps", "training.eval_steps=2", "training.save_steps=2", "training.logging_steps=2",
                 "training.output_dir=unused", CALLBACK]:
        _set_dotted(raw, *parse_override(item))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    sweep = {
        "base": str(tmp_path / "base.yaml"), "command": "pretrain", "metric": "eval_loss", "direction": "minimize",
        "search": {"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "training.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}},
        "n_trials": 3, "seed": 0, "pruner_startup_trials": 1, "output_dir": str(tmp_path / "sweep"),
    }
    sweep.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def start_worker(sweep, marker=None, **hooks):
    env = hook_env(marker, **hooks)
    return subprocess.Popen([sys.executable, "-m", "llmcli", "sweep", "--config", str(sweep)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_paused(proc, marker):
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"worker ended before pausing (exit {proc.returncode}): {proc.communicate()[1].decode()}")
        time.sleep(0.05)


def trials(out):
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    return {t.number: t for t in study.get_trials()}


def test_two_workers_then_kill9_and_sigterm_mid_trial_and_the_rerun_resumes_both(cli, tmp_path):
    sweep, out = write_sweep(tmp_path), tmp_path / "sweep"
    # Warm the tokenizer/tokenized-data cache first: two processes that miss the same entry at once
    # can break the slower one (publish_dir replaces the entry the other one has open; an engine issue).
    cli("pretrain", "--config", tmp_path / "base.yaml", "--set", "training.max_steps=1", "--set", "training.eval_strategy=no",
        "-o", tmp_path / "warm")
    markers = [tmp_path / "a", tmp_path / "b"]
    a, b = workers = [start_worker(sweep, m, PAUSE_AT_STEP=3) for m in markers]  # both open the new study.db at once
    for w, m in zip(workers, markers):
        wait_paused(w, m)  # each paused in its own trial after step 3, with checkpoint-2 on disk
    running = trials(out)
    assert sorted(running) == [0, 1]
    of = {t.user_attrs["worker_pid"]: n for n, t in running.items()}
    assert sorted(of) == sorted([a.pid, b.pid])

    # a third worker (this process) runs the last trial; the two running ones count towards n_trials
    c = cli("sweep", "--config", sweep)
    assert "trial 2/3" in c.stderr and "trial 0/3" not in c.stderr and "trial 1/3" not in c.stderr
    assert [r["state"] for r in read_jsonl(out / "leaderboard.jsonl")] == ["COMPLETE", "RUNNING", "RUNNING"]

    b.send_signal(signal.SIGKILL)
    b.wait()
    a.send_signal(signal.SIGTERM)
    err = a.communicate(timeout=120)[1].decode()
    assert a.returncode == 143 and "stopped by SIGTERM at step 3" in err and "Traceback" not in err, err
    ta, tb = out / f"trial-{of[a.pid]:04d}", out / f"trial-{of[b.pid]:04d}"
    assert (ta / "checkpoint-3").is_dir() and (tb / "checkpoint-2").is_dir() and not (tb / "checkpoint-3").exists()
    assert not (ta / "summary.json").exists() and not (tb / "summary.json").exists()
    assert {trials(out)[n].state.name for n in (0, 1)} == {"RUNNING"}  # left for the next run, neither failed nor lost

    result = cli("sweep", "--config", sweep)  # the same command again
    assert result.stderr.count("was interrupted") == 2 and f"worker pid {b.pid}" in result.stderr
    found = trials(out)
    assert sorted(found) == [0, 1, 2] and {t.state.name for t in found.values()} <= {"COMPLETE", "PRUNED"}
    summaries = {n: json.loads((out / f"trial-{n:04d}" / "summary.json").read_text()) for n in found}
    assert {n: s["resumed_from"] for n, s in summaries.items()} == {of[a.pid]: 3, of[b.pid]: 2, 2: None}
    assert all(found[n].params == running[n].params for n in (0, 1))  # the same trials, not new ones
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0000", "trial-0001", "trial-0002"]
    # the leaderboard's runtime is both sessions' of the trial stopped by SIGTERM (each session ended with
    # Trainer's closing record); summary.json's is the last session's only
    board = {r["trial"]: r for r in read_jsonl(out / "leaderboard.jsonl")}
    sessions = [r["train_runtime"] for r in read_jsonl(ta / "metrics.jsonl") if "train_loss" in r]
    assert len(sessions) == 2 and summaries[of[a.pid]]["train_runtime_s"] == sessions[-1]
    assert board[of[a.pid]]["train_runtime_s"] == pytest.approx(sum(sessions), rel=1e-9)

    # every trial dir is an ordinary run whose config holds the trial's parameters
    for n, t in found.items():
        run, s = out / f"trial-{n:04d}", summaries[n]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["training"]["learning_rate"] == t.params["training.learning_rate"]
        assert cfg["training"]["weight_decay"] == t.params["training.weight_decay"]
        assert s["pruned"] is (t.state.name == "PRUNED") and s["trial"] == n
        assert t.value == pytest.approx(s["eval_loss"], rel=1e-6)
        evals = [e["eval_loss"] for e in read_jsonl(run / "metrics.jsonl") if "eval_loss" in e]
        assert [t.intermediate_values[i + 1] for i in range(len(evals))] == pytest.approx(evals, rel=1e-6)
        if t.state.name == "PRUNED":  # the median rule, checked independently of Optuna
            k = t.user_attrs["pruned_at_eval"]
            assert s["global_step"] == 2 * k < MAX_STEPS and len(evals) == k
            earlier = [u.intermediate_values[k] for u in found.values()
                       if u.state.name == "COMPLETE" and u.datetime_complete < t.datetime_complete]
            assert t.intermediate_values[k] > statistics.median(earlier)
        else:
            assert s["global_step"] == MAX_STEPS and len(evals) == MAX_STEPS // 2
    assert sum(t.state.name == "PRUNED" for t in found.values()) == 1

    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    records = read_jsonl(out / "leaderboard.jsonl")
    complete = sorted((t.value, n) for n, t in found.items() if t.state.name == "COMPLETE")
    assert [int(r["trial"]) for r in rows] == [r["trial"] for r in records] and len(rows) == 3
    assert [int(r["trial"]) for r in rows][: len(complete)] == [n for _, n in complete]
    assert float(rows[0]["eval_loss"]) == pytest.approx(complete[0][0], rel=1e-9)
    board = result.stdout.splitlines()
    title = board.index("sweep leaderboard (minimize eval_loss)")
    assert board[title + 1].split()[:4] == ["rank", "trial", "state", "eval_loss"] and len(board) >= title + 5

    best = out / "best.yaml"
    best_cfg = yaml.safe_load(best.read_text())
    winner = found[complete[0][1]]
    assert best_cfg["training"]["learning_rate"] == winner.params["training.learning_rate"]
    assert best_cfg["training"]["output_dir"] == str(out / "best")
    dry = cli("pretrain", "--config", best, "--dry-run")
    assert yaml.safe_load(dry.stdout)["training"]["weight_decay"] == winner.params["training.weight_decay"]
    for name in ("optimization_history.png", "contour.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    again = cli("sweep", "--config", sweep, "--json")  # at n_trials: no new trial, only the reports
    best_json = json.loads(again.stdout)
    assert (best_json["trial"], best_json["value"], best_json["params"]) == (winner.number, winner.value, winner.params)
    assert sorted(trials(out)) == [0, 1, 2]


def _bad_sweeps(tmp_path):
    lr = {"type": "float", "low": 1e-4, "high": 1e-2}
    return [
        ({"search": {"training.learning_rate": {**lr, "low": 1e-1}}}, "search 'training.learning_rate': low 0.1 > high 0.01"),
        ({"search": {"training.learning_rat": lr}}, "search 'training.learning_rat' = 0.0001: unknown config key 'training.learning_rat'"),
        ({"search": {"modle.n_layer": {"type": "int", "low": 1, "high": 2}}}, "unknown config key 'modle' at the top level (did you mean 'model'?)"),
        ({"search": {"training.per_device_train_batch_size": lr}},
         "search 'training.per_device_train_batch_size' = 0.0001: config key 'training.per_device_train_batch_size': expected int"),
        ({"search": {"training.seed": {"type": "int", "low": 0.5, "high": 3}}}, "type int needs an integer 'low', got 0.5"),
        ({"search": {"training.seed": {"type": "categorical"}}}, "type categorical needs a non-empty 'choices' list"),
        ({"search": {"training.learning_rate": {**lr, "log": True, "low": 0}}}, "log: true needs low > 0"),
        ({"sampler": "grid"}, "the grid sampler needs a 'step' for a float range"),
        ({"search": {"training.learning_rate": {**lr, "lo": 1}}}, "unknown key 'lo' in search 'training.learning_rate' (did you mean 'low'?)"),
        ({"n_trial": 3}, "unknown sweep key 'n_trial' (did you mean 'n_trials'?)"),
        ({"direction": "up"}, "sweep key 'direction': Input should be 'maximize' or 'minimize'"),
        ({"base": str(tmp_path / "nope.yaml")}, "base config: config file not found"),
        ({"metric": "eval_acc"}, "metric 'eval_acc' is not among the evaluation results (eval_loss)"),
        ({"confirm": {"top_k": 2, "seeds": [1, 1]}}, "sweep key 'confirm.seeds': Value error, seeds repeat a value: [1, 1]"),
        ({"confirm": {"top": 2, "seeds": [1]}}, "unknown sweep key 'confirm.top' (did you mean 'top_k'?)"),
        ({"confirm": {"top_k": 0, "seeds": [1]}}, "sweep key 'confirm.top_k': Input should be greater than or equal to 1"),
    ]


def test_bad_sweep_files_give_one_line_and_exit_2(cli, tmp_path):
    for changes, message in _bad_sweeps(tmp_path):
        sweep = write_sweep(tmp_path, **changes)
        result = cli("sweep", "--config", sweep, "--set", "training.max_steps=2", expect=None)
        assert result.exit_code == 2, (changes, result.exit_code, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
        assert message in errors[0], (changes, errors[0])


def test_a_missing_test_file_is_a_data_error_before_any_trial(cli, tmp_path):
    result = cli("sweep", "--config", write_sweep(tmp_path, test_file=str(tmp_path / "nope.txt")), expect=4)
    assert result.stderr.strip().endswith(f"test_file {tmp_path / 'nope.txt'}: no such file") and not (tmp_path / "sweep").exists()


def test_shipped_sweep_config_validates(monkeypatch):
    monkeypatch.chdir(ROOT)  # its base path is relative to the current directory, like every llmcli path
    sweep = load_sweep_config("configs/sweep-sst2-minilm.yaml")
    assert (sweep.command, sweep.metric, sweep.direction, sweep.sampler) == ("finetune", "eval_accuracy", "maximize", "grid")
    assert sweep.base_overrides(["training.seed=1"]) == [
        "data.max_train_samples=2000", "training.eval_strategy=steps", "training.eval_steps=0.25", "training.seed=1"]


def test_worker_liveness_rules(tmp_path):
    """Which RUNNING trials a rerun takes over. Here: a trial dir whose run lock is held is alive; one
    whose lock file is left unheld is not, whatever pid it names (the checker's own, pid 1 after a
    container restart, a reused one), unless it is starting again: re-attached since its worker was
    recorded (its start is newer than its heartbeat), or claimed moments ago by a live pid that has not
    taken the lock yet (the race where two workers both reported the same orphan). Before the lock
    exists, a live pid of this boot other than the checker's own. Elsewhere: a fresh heartbeat."""
    import datetime
    import socket

    import optuna

    from llmcli.sweep.sweep import CLAIM_GRACE_S, STALE_AFTER_S, _boot_id, _worker_alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from llmcli.train.rundir import RunLock; "
                               "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path / "trial-0001")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    stale = tmp_path / "trial-0002"
    stale.mkdir()
    (stale / ".llmcli.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # killed: not held
    now = time.time()
    here = {"worker_host": socket.gethostname(), "worker_boot": _boot_id(), "heartbeat": now - 5}  # claimed 5 s after its start
    cases = [  # (trial number, attrs, age (since its start), alive)
        (0, {**here, "worker_pid": live.pid}, 10, True),  # no lock file yet: the pid
        (0, {**here, "worker_pid": dead.pid}, 10, False),
        (0, {**here, "worker_pid": os.getpid()}, 10, False),  # the checker itself is not running it
        (0, {**here, "worker_boot": "another-boot", "worker_pid": live.pid}, 10, False),  # a reboot reused the pid
        (1, {**here, "worker_pid": holder.pid}, 0, True),  # the lock is held
        # a lock file nobody holds (its run was killed), with the heartbeat of the claim that started it
        (2, {**here, "worker_pid": os.getpid()}, 10, False),  # the checker itself
        (2, {**here, "worker_pid": dead.pid}, 10, False),  # the killed worker: taken over at once
        (2, {**here, "worker_pid": 1, "heartbeat": now - CLAIM_GRACE_S - 1}, CLAIM_GRACE_S + 10, False),  # pid 1, claimed long ago
        (2, {**here, "worker_pid": live.pid, "heartbeat": now - CLAIM_GRACE_S - 1}, CLAIM_GRACE_S + 10, False),  # a reused pid
        (2, {**here, "worker_pid": live.pid}, 10, True),  # claimed 5 s ago, its lock not taken yet
        (2, {**here, "worker_pid": dead.pid, "heartbeat": now - 50}, 10, True),  # re-attached 10 s ago, not yet recorded
        (2, {**here, "worker_pid": dead.pid, "heartbeat": now - STALE_AFTER_S - 50}, STALE_AFTER_S + 1, False),  # nobody came
        (0, {"worker_host": "elsewhere", "worker_pid": 1, "heartbeat": now - 10}, 0, True),
        (0, {"worker_host": "elsewhere", "worker_pid": 1, "heartbeat": now - STALE_AFTER_S - 1}, 0, False),
        (0, {}, 10, True),  # killed between ask() and recording its worker: waits for the stale period
        (0, {}, STALE_AFTER_S + 1, False),
    ]
    try:
        for number, attrs, age, alive in cases:
            trial = optuna.trial.FrozenTrial(
                number=number, state=optuna.trial.TrialState.RUNNING, value=None, values=None,
                datetime_start=datetime.datetime.fromtimestamp(now - age), datetime_complete=None, params={},
                distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number)
            assert _worker_alive(trial, now, tmp_path) is alive, (number, attrs)
    finally:
        live.kill()
        holder.kill()


@pytest.mark.parametrize("warmup_evals", [0, 1, 2])
def test_pruner_warmup_evals_spares_exactly_that_many_evaluations(tmp_path, warmup_evals):
    """`pruner_warmup_evals: N`: a trial far below the median still runs its first N evaluations (the
    sweep reports evaluation 1, 2, ...; Optuna's n_warmup_steps counts from step 0). The pruner is the
    one `llmcli sweep` opens its study with; the values are fed as a minimizing sweep reports them."""
    import optuna

    from llmcli.sweep.study import open_study as _open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = load_sweep_config(write_sweep(tmp_path, pruner_warmup_evals=warmup_evals))
    (tmp_path / "sweep").mkdir()
    study = _open_study(sweep, tmp_path / "sweep", None, [])
    finished = study.ask()
    for step in (1, 2, 3, 4):
        finished.report(1.0, step)
    study.tell(finished, 1.0)
    high = study.ask()
    spared = 0
    for step in (1, 2, 3, 4):
        high.report(9.0, step)  # a loss far above the finished trial's
        if high.should_prune():
            break
        spared += 1
    assert spared == warmup_evals


def test_baseline_params_are_the_base_config_point_or_say_why_not(tmp_path):
    """`baseline: true` (the default): trial 0's parameters are the base config's values (learning_rate 3e-3,
    batch 8, seed 0, max_train_samples unset here), each spelled as the search space spells it, or None with the reason."""

    def baseline(search, **changes):
        sweep = load_sweep_config(write_sweep(tmp_path, search=search, **changes))
        return sweep.baseline_params(sweep.base_overrides())

    lr, batch = "training.learning_rate", "training.per_device_train_batch_size"
    assert baseline({lr: {"type": "categorical", "choices": [1.0e-3, 3.0e-3]}, batch: {"type": "categorical", "choices": [4, 8]}}) == (
        {lr: 3e-3, batch: 8}, "")
    # YAML reads 3e-3 (no dot) as a string; a trial given it gets the number, so it is the base value
    assert baseline({lr: {"type": "categorical", "choices": ["1e-3", "3e-3"]}}) == ({lr: "3e-3"}, "")
    assert baseline({lr: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}) == ({lr: 3e-3}, "")
    assert baseline({lr: {"type": "float", "low": 1e-3, "high": 5e-3, "step": 1e-3}}, sampler="grid") == ({lr: 0.003}, "")
    assert baseline({"training.seed": {"type": "int", "low": 0, "high": 4, "step": 2}}) == ({"training.seed": 0}, "")
    assert baseline({"training.seed": {"type": "int", "low": 1, "high": 5, "step": 2}}) == (
        None, "the base config's training.seed=0 is outside the search space")
    assert baseline({lr: {"type": "float", "low": 1e-2, "high": 1e-1}}) == (
        None, "the base config's training.learning_rate=0.003 is outside the search space")
    assert baseline({"data.max_train_samples": {"type": "categorical", "choices": [None, 100]}}) == ({"data.max_train_samples": None}, "")
    assert baseline({"data.max_train_samples": {"type": "categorical", "choices": [50, 100]}}) == (
        None, "the base config does not set data.max_train_samples")
    assert baseline({lr: {"type": "float", "low": 1e-4, "high": 1e-2}, "training.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}) == (
        None, "the base config does not set training.weight_decay")
    assert baseline({lr: {"type": "float", "low": 1e-4, "high": 1e-2}}, baseline=False) == (None, "baseline: false")


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_the_base_config_point_is_trial_0_and_the_grid_still_runs_each_point_once(tmp_path, sampler):
    """Trials asked in turn by two workers (two study handles on one storage). The second worker's own
    baseline decision is ignored: the study keeps the one it was created with, as does a study created
    before baselines existed (its identity has no `baseline`)."""
    import optuna

    from llmcli.sweep.study import open_study as _open_study
    from llmcli.sweep.sweep import _suggest_param

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = {"training.learning_rate": {"type": "categorical", "choices": [1.0e-3, 3.0e-3]},
              "training.per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]}}
    base_point = (3e-3, 8)

    def points(name, baseline, second, older=False):
        """Trials 0-3 asked in turn by two workers; the second opens the study with its own decision `second`."""
        sweep = load_sweep_config(write_sweep(tmp_path, search=search, sampler=sampler, baseline=baseline, n_trials=4))
        out = tmp_path / name
        out.mkdir()
        decided = sweep.baseline_params(sweep.base_overrides())
        if older:  # a study an older llmcli created: its identity has no baseline
            study = _open_study(sweep, out, None, [], (None, ""))
            study.set_user_attr("sweep", {k: v for k, v in study.user_attrs["sweep"].items() if k != "baseline"})
        workers = [_open_study(sweep, out, None, [], decided), _open_study(sweep, out, None, [], second)]
        got = []
        for i in range(4):
            study = workers[i % 2]
            trial = study.ask()
            got.append(tuple(_suggest_param(trial, k, s) for k, s in sweep.search.items()))
            study.tell(trial, 1.0)
        return got

    other = ({"training.learning_rate": 1e-3, "training.per_device_train_batch_size": 4}, "")
    with_baseline, without = points("with", True, (None, "")), points("without", False, other)
    assert with_baseline[0] == base_point and without[0] != base_point
    assert points("older", True, other, older=True) == without
    if sampler == "grid":  # seed 0 shuffles the base point to second place; the baseline moves it to the front
        assert without == [(3e-3, 4), base_point, (1e-3, 8), (1e-3, 4)]
        assert with_baseline == [base_point, (3e-3, 4), (1e-3, 8), (1e-3, 4)]  # every point once, the rest in order


def test_baseline_trial_is_the_base_config_run(cli, tmp_path):
    """Trial 0 of a baseline sweep is the base config's own run (same loss as `llmcli pretrain` of it, so the
    sweep's best is never worse), marked on the leaderboard; the grid's other point is still run."""
    sweep = write_sweep(tmp_path, search={"training.learning_rate": {"type": "categorical", "choices": [1.0e-3, 3.0e-3]}},
                        sampler="grid", seed=1, pruner="none", n_trials=None)  # seed 1 puts 1e-3 first in the shuffle
    out = tmp_path / "sweep"
    result = cli("sweep", "--config", sweep)
    assert "trial 0 runs the base config's values: training.learning_rate=0.003" in result.stderr
    found = trials(out)
    assert [found[n].params["training.learning_rate"] for n in (0, 1)] == [3e-3, 1e-3]
    alone = cli("pretrain", "--config", tmp_path / "base.yaml", "-o", tmp_path / "alone")
    assert alone.exit_code == 0
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert found[0].value == pytest.approx(summary["eval_loss"], rel=1e-6)
    notes = {r["trial"]: r["note"] for r in read_jsonl(out / "leaderboard.jsonl")}
    assert notes == {0: "the base config", 1: ""}


def test_sweep_output_for_cron(cli, tmp_path):
    """stdout holds the leaderboard alone (each trial's closing table goes to stderr), so `llmcli sweep >
    board.txt` captures the board; `--quiet` ends with one line for cron mail; `--dry-run` runs nothing."""
    sweep = write_sweep(tmp_path, search={"training.learning_rate": {"type": "categorical", "choices": [1.0e-3, 3.0e-3]}},
                        sampler="grid", pruner="none", n_trials=None)
    out = tmp_path / "sweep"
    dry = cli("sweep", "--config", sweep, "--dry-run")
    assert yaml.safe_load(dry.stdout)["sampler"] == "grid" and not out.exists()
    assert "trials: 2" in dry.stderr and "trial 0: training.learning_rate=0.003" in dry.stderr
    result = cli("sweep", "--config", sweep)
    board = result.stdout.splitlines()
    assert board[0] == "sweep leaderboard (minimize eval_loss)" and len(board) == 4  # title, header, two trials
    assert result.stderr.count("pretrain finished: ") == 2
    best = json.loads(cli("sweep", "--config", sweep, "--json").stdout)
    quiet = cli("sweep", "--config", sweep, "--quiet")  # at its budget: the reports only
    assert quiet.stdout == ""
    assert quiet.stderr == f"llmcli: sweep {out} finished best=trial {best['trial']} eval_loss={best['value']:.6g}\n"


def test_the_final_evaluation_of_the_best_model_is_not_reported(cli, tmp_path):
    """With load_best_model_at_end, `fit` evaluates the reloaded best model after training: that is no
    evaluation of the schedule, so the pruner sees exactly the scheduled ones (it saw one more)."""
    import optuna

    sweep = write_sweep(tmp_path, n_trials=1, overrides={"training.load_best_model_at_end": True})
    cli("sweep", "--config", sweep)
    (trial,) = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}").get_trials()
    assert sorted(trial.intermediate_values) == [1, 2, 3]  # 6 steps, an evaluation every 2
    evals = [r for r in read_jsonl(tmp_path / "sweep" / "trial-0000" / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 4  # the scheduled three and the best model's, which metrics.jsonl still records


def test_a_misspelt_metric_does_not_poison_the_sweep_dir(cli, tmp_path):
    """The misspelt metric fails at the first evaluation (exit 2); the corrected file then runs in the same
    dir, since the study holds no result. A study with results still refuses a different sweep."""
    out = tmp_path / "sweep"
    wrong = cli("sweep", "--config", write_sweep(tmp_path, metric="eval_perplexity", n_trials=1), expect=2)
    assert "metric 'eval_perplexity' is not among the evaluation results (eval_loss)" in wrong.stderr
    fixed = cli("sweep", "--config", write_sweep(tmp_path, n_trials=1))
    assert "it now runs this sweep ('metric' was 'eval_perplexity', now 'eval_loss')" in fixed.stderr
    assert [r["state"] for r in read_jsonl(out / "leaderboard.jsonl")] == ["COMPLETE", "FAIL"]
    other = cli("sweep", "--config", write_sweep(tmp_path, metric="eval_perplexity", n_trials=2), expect=2)
    assert "was made by a different sweep ('metric' was 'eval_loss', now 'eval_perplexity')" in other.stderr


def test_a_failed_trial_is_retried_once_then_recorded_and_the_grid_goes_on(cli, tmp_path, monkeypatch):
    """A trial that fails (a simulated out-of-memory at one learning rate) runs once more with its own
    parameters, is then recorded as failed, and the sweep goes on: each grid point is run and counted
    once, the leaderboard lists every trial, and a rerun asks for no trial past the grid."""
    monkeypatch.setenv("HOOK_FAIL_AT_LR", "0.003")
    sweep = write_sweep(tmp_path, search={"training.learning_rate": {"type": "categorical", "choices": [1.0e-3, 3.0e-3]}},
                        sampler="grid", pruner="none", n_trials=None)  # trial 0 is the base config's 3e-3
    out = tmp_path / "sweep"
    result = cli("sweep", "--config", sweep)
    assert "trial 0 failed (RuntimeError: CUDA out of memory" in result.stderr
    assert "trial 1 (a retry of trial 0) failed again" in result.stderr
    found = trials(out)
    assert [(n, t.state.name, t.params["training.learning_rate"]) for n, t in sorted(found.items())] == [
        (0, "FAIL", 3e-3), (1, "FAIL", 3e-3), (2, "COMPLETE", 1e-3)]
    assert found[1].user_attrs["retry_of"] == 0
    rows = read_jsonl(out / "leaderboard.jsonl")
    assert sorted(r["trial"] for r in rows) == [0, 1, 2]
    again = cli("sweep", "--config", sweep)  # at the grid's size: no trial past it, no point run again
    assert "trial 3" not in again.stderr and sorted(trials(out)) == [0, 1, 2]


CLAIM = """
import sys, time
from pathlib import Path
import optuna
from optuna.storages._rdb import models
from llmcli.sweep.study import _rdb_storage

read = models.TrialModel.find_or_raise_by_id.__func__

def slow(cls, trial_id, session, for_update=False):
    trial = read(cls, trial_id, session, for_update)
    time.sleep(0.02)  # the other worker reads the same WAITING trial meanwhile
    return trial

models.TrialModel.find_or_raise_by_id = classmethod(slow)
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=_rdb_storage(sys.argv[1]))
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print(study._pop_waiting_trial_id(), flush=True)
"""


def test_two_workers_never_claim_one_waiting_trial_on_sqlite(tmp_path):
    """Optuna claims a WAITING trial with SELECT ... FOR UPDATE, which SQLite ignores: two workers could
    both read it WAITING and both run it. llmcli's SQLite storage starts every transaction with BEGIN
    IMMEDIATE, so the read and the write of a claim are one step: with 20 ms between them, exactly one
    of two processes gets the trial, in every round."""
    import optuna

    from llmcli.sweep.study import _rdb_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=_rdb_storage(url))
    for round_ in range(3):
        study.enqueue_trial({"x": round_})
        go = tmp_path / f"go-{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", CLAIM, url, str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
                 for _ in range(2)]
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        go.touch()
        claims = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert claims.count("None") == 1 and len(set(claims)) == 2, claims  # one claim, and an empty queue for the other


def test_four_workers_on_one_grid_with_a_kill(cli, tmp_path):
    """Four worker processes start together on a new study over a 4-point grid; one is killed -9 in
    the middle of its trial and its orphan is resumed once (by a surviving worker, or the rerun):
    exactly four finished trials, each grid point once, no failure, no worker crash, the leaderboard
    complete."""
    grid = [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]
    sweep = write_sweep(tmp_path, search={"training.learning_rate": {"type": "categorical", "choices": grid}},
                        sampler="grid", pruner="none", n_trials=None, baseline=False)
    out = tmp_path / "sweep"
    cli("pretrain", "--config", tmp_path / "base.yaml", "--set", "training.max_steps=1", "--set", "training.eval_strategy=no",
        "-o", tmp_path / "warm")  # the tokenized-data cache, built once (see the two-worker test)
    victim_marker = tmp_path / "victim"
    victim = start_worker(sweep, victim_marker, PAUSE_AT_STEP=3)
    others = [start_worker(sweep) for _ in range(3)]
    wait_paused(victim, victim_marker)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    logs = []
    for w in others:
        logs.append(w.communicate(timeout=300)[1].decode())
        assert w.returncode == 0 and "Traceback" not in logs[-1], logs[-1]
    logs.append(cli("sweep", "--config", sweep).stderr)  # the same command again: nothing left, or the orphan
    # the killed worker's trial was taken over exactly once: by a surviving worker (its lock is no longer held) or the rerun
    assert sum(log.count("was interrupted") for log in logs) == 1, logs
    found = trials(out)
    assert sorted(found) == [0, 1, 2, 3]
    assert {t.state.name for t in found.values()} == {"COMPLETE"}
    assert sorted(t.params["training.learning_rate"] for t in found.values()) == grid  # every point once
    assert sorted(r["trial"] for r in read_jsonl(out / "leaderboard.jsonl")) == [0, 1, 2, 3]


def test_report_knows_a_sweep_and_watches_it_until_done(cli, tmp_path):
    """`llmcli report <sweep>`: each trial with its parameters and the study's state, the sweep's
    progress; a requeued trial reads `waiting`; `--watch` follows the sweep until the study is done,
    new trials included; and report stays torch-free."""
    import optuna

    sweep = write_sweep(tmp_path, n_trials=2, pruner="none")
    out = tmp_path / "sweep"
    cli("sweep", "--config", sweep)
    report = json.loads(cli("report", out, "--json").stdout)
    (info,) = report["sweeps"]
    assert (info["budget"], info["counted"], info["states"], info["done"]) == (2, 2, {"COMPLETE": 2}, True)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert {r["trial"]["number"]: r["trial"]["params"] for r in report["runs"]} == {t.number: t.params for t in study.get_trials()}
    text = cli("report", out).stdout.splitlines()
    assert text[0] == f"sweep {out}: 2 of 2 trials (complete 2), done" and "learning_rate=" in text[2]

    # the sweep file now asks for 3 trials: not done until a worker has run the third
    study.set_user_attr("budget", 3)
    assert json.loads(cli("report", out, "--json").stdout)["sweeps"][0]["done"] is False
    watch = subprocess.Popen([sys.executable, "-m", "llmcli", "report", str(out), "--watch", "--interval", "0.2", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert watch.poll() is None  # still watching: the study is short of its trials
    assert "trial 2/3" in cli("sweep", "--config", write_sweep(tmp_path, n_trials=3, pruner="none")).stderr
    final, err = watch.communicate(timeout=120)
    assert watch.returncode == 0, err
    done = json.loads(final)
    assert done["sweeps"][0]["states"] == {"COMPLETE": 3} and done["sweeps"][0]["done"]
    assert sorted(r["trial"]["number"] for r in done["runs"]) == [0, 1, 2]  # the new trial joined the report

    # an orphan put back in the queue (its dir holds a run that stopped): waiting, not interrupted
    orphan = study.ask()
    study._storage.set_trial_state_values(orphan._trial_id, state=optuna.trial.TrialState.WAITING)
    (out / f"trial-{orphan.number:04d}").mkdir()
    (out / f"trial-{orphan.number:04d}" / "config.yaml").write_text((out / "trial-0000" / "config.yaml").read_text())
    rows = {r["trial"]["number"]: r for r in json.loads(cli("report", out, "--json").stdout)["runs"]}
    assert rows[orphan.number]["status"] == "waiting" and rows[0]["status"] == "finished"

    code = ("import sys\nfrom llmcli.cli import app\n"
            f"try:\n    app(['report', {str(out)!r}, '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    only = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert only.returncode == 0 and only.stdout.strip().splitlines()[-1] == "[]", only.stderr


@pytest.mark.parametrize("pruner, cls", [("successive_halving", "SuccessiveHalvingPruner"), ("hyperband", "HyperbandPruner")])
def test_successive_halving_and_hyperband_prune_on_evaluations(cli, tmp_path, pruner, cls):
    """The evaluation is their resource: pruner_warmup_evals + 1 is the smallest rung; a sweep runs with them."""
    from llmcli.sweep.study import make_pruner

    made = make_pruner(load_sweep_config(write_sweep(tmp_path, pruner=pruner, pruner_warmup_evals=1)))
    assert type(made).__name__ == cls and made._min_resource == 2
    result = cli("sweep", "--config", write_sweep(tmp_path, pruner=pruner, n_trials=3), "--set", "training.max_steps=4")
    states = [r["state"] for r in read_jsonl(tmp_path / "sweep" / "leaderboard.jsonl")]
    assert len(states) == 3 and set(states) <= {"COMPLETE", "PRUNED"} and states[0] == "COMPLETE", result.stderr


def test_confirm_reruns_the_top_trials_with_more_seeds_and_reports_the_winner_on_a_test_file(cli, tmp_path):
    """confirm: the 2 best of 3 trials run again with seed 1; seed 0 (the base config's) reuses each trial's own
    run. The leaderboard's mean and sample std are those of the run dirs' own results, the best mean heads it and
    is best.yaml, and the winner's runs are evaluated on test_file exactly as `llmcli eval` does. A rerun runs nothing."""
    test_file = FIXTURES / "shakespeare_small.txt"
    sweep = write_sweep(tmp_path, pruner="none", confirm={"top_k": 2, "seeds": [0, 1]}, test_file=str(test_file))
    out = tmp_path / "sweep"
    result = cli("sweep", "--config", sweep)
    assert result.stderr.count("pretrain finished: ") == 5  # 3 trials, 2 confirm runs
    found = trials(out)
    top = sorted(found.values(), key=lambda t: (t.value, t.number))[:2]
    assert sorted(p.name for p in out.glob("trial-*-seed-*")) == sorted(f"trial-{t.number:04d}-seed-1" for t in top)
    board = {r["trial"]: r for r in read_jsonl(out / "leaderboard.jsonl")}
    means = {}
    for t in top:
        seed_dir = out / f"trial-{t.number:04d}-seed-1"
        assert yaml.safe_load((seed_dir / "config.yaml").read_text())["training"]["seed"] == 1
        values = [json.loads((seed_dir / "summary.json").read_text())["eval_loss"], t.value]
        assert values[0] != t.value  # another seed, another result
        c = board[t.number]["confirm"]
        assert c["values"] == {"0": values[1], "1": values[0]} and c["n"] == 2 and c["pending"] == []
        assert c["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert c["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        means[t.number] = c["mean"]
    winner = min(means, key=means.get)
    ranked = read_jsonl(out / "leaderboard.jsonl")
    assert [r["trial"] for r in ranked[:2]] == sorted(means, key=means.get) and "confirm" not in ranked[2]
    assert f"best trial: {winner} of {out}" in (out / "best.yaml").read_text()
    test = board[winner]["test"]
    for run_dir in (out / f"trial-{winner:04d}-seed-1", out / f"trial-{winner:04d}"):
        ref = json.loads(cli("eval", "--model", run_dir, "--data", test_file, "--json").stdout)["metrics"]["nll"]
        assert test["values"][str(run_dir)] == pytest.approx(ref, rel=1e-6)
        assert json.loads((run_dir / "test.json").read_text())["metrics"]["nll"] == test["values"][str(run_dir)]
    assert test["metric"] == "nll" and test["mean"] == pytest.approx(statistics.fmean(test["values"].values()), rel=1e-12)
    header = result.stdout.splitlines()[1]
    assert "mean ± std (seeds)" in header and "test nll" in header
    again = cli("sweep", "--config", sweep, "--json")
    assert "pretrain finished" not in again.stderr and "evaluating" not in again.stderr
    best = json.loads(again.stdout)
    assert best["trial"] == winner and best["confirm"]["mean"] == means[winner] and best["test"] == test


def test_confirm_runs_are_shared_by_workers_and_a_killed_one_resumes_once(cli, tmp_path):
    """Worker A runs the search and pauses in its first confirm run; worker B joins, runs the other confirm run,
    then waits for A's; A is killed -9 and B resumes its run from the checkpoint. Each (trial, seed) ran once."""
    import optuna

    sweep = write_sweep(tmp_path, pruner="none", confirm={"top_k": 2, "seeds": [0, 1]})
    out, marker = tmp_path / "sweep", tmp_path / "a"
    a = start_worker(sweep, marker, PAUSE_AT_STEP=3, PAUSE_SEED=1)
    wait_paused(a, marker)
    b = start_worker(sweep)
    deadline = time.time() + 120
    while len(list(out.glob("trial-*-seed-1/summary.json"))) < 1 and time.time() < deadline and b.poll() is None:
        time.sleep(0.1)
    a.send_signal(signal.SIGKILL)
    a.wait()
    err = b.communicate(timeout=120)[1].decode()
    assert b.returncode == 0 and "Traceback" not in err, err
    assert err.count("was interrupted") == 1 and f"worker pid {a.pid}" in err
    assert err.count("pretrain finished: ") == 2 and "(resuming)" in err  # B's own confirm run and A's, resumed
    runs = optuna.load_study(study_name="sweep-confirm", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert sorted((t.user_attrs["confirm_of"], t.user_attrs["seed"], t.state.name) for t in runs if not t.user_attrs.get("surplus")) == \
        sorted((t.number, 1, "COMPLETE") for t in sorted(trials(out).values(), key=lambda t: t.value)[:2])
    resumed = [json.loads(p.read_text()).get("resumed_from") for p in out.glob("trial-*-seed-1/summary.json")]
    assert sorted(resumed, key=str) == [2, None]
    board = [r for r in read_jsonl(out / "leaderboard.jsonl") if "confirm" in r]
    assert len(board) == 2 and all(r["confirm"]["n"] == 2 and not r["confirm"]["pending"] for r in board)
