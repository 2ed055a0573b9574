"""curves.png (draw_curves, CurvesCallback in a real engine run, resume) and `llmcli report`."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, TINY_GPT2, read_jsonl, sets

RUN = [*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "training.max_steps=20",
       "training.eval_strategy=steps", "training.eval_steps=10", "training.save_steps=10"]
TOKENS_PER_STEP = 8 * 32  # per_device_train_batch_size x block_size: every block is full
INTERRUPT_AT = 13


def _engine_run(out, interrupt_at=None):
    """pretrain through the engine, curves on (the default); SIGINT at `interrupt_at` (as Ctrl-C would)."""
    from hooks import TestHooks
    from llmcli.train import pretrain
    from llmcli.config import load_config
    from llmcli.errors import Interrupted

    cfg = load_config(None, [*RUN, "training.curves=true", f"training.output_dir={out}"])
    if interrupt_at is None:
        return pretrain.run(cfg)
    marker = out.parent / f"{out.name}.paused"
    os.environ.update(HOOK_PAUSE_AT_STEP=str(interrupt_at), HOOK_MARKER=str(marker))

    def interrupt():
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # the run's own handler is installed while it trains

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        with pytest.raises(Interrupted):
            pretrain.run(cfg, callbacks=(TestHooks(),))
    finally:
        thread.join()
        for key in ("HOOK_PAUSE_AT_STEP", "HOOK_MARKER"):
            os.environ.pop(key, None)


@pytest.fixture(scope="session")
def runs(tmp_path_factory, _isolated_caches):
    """finished: a plain CLI run; interrupted: Ctrl-C at step 13; resumed: that run carried on to
    the end. The last two draw curves, as every run does by default."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    root = tmp_path_factory.mktemp("report")
    finished = root / "finished"
    result = CliRunner().invoke(app, ["pretrain", *sets(*RUN), "-o", str(finished)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    resumed = root / "resumed"
    _engine_run(resumed, interrupt_at=INTERRUPT_AT)
    interrupted = root / "interrupted"
    shutil.copytree(resumed, interrupted)
    _engine_run(resumed)
    return {"finished": finished, "interrupted": interrupted, "resumed": resumed}


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --------------------------------------------------------------------------------------------
# curves


def test_curves_png_after_an_interrupted_and_a_resumed_run(runs):
    from llmcli.train import curves

    # the callback drew at the interruption (train_end) ...
    assert _png_size(runs["interrupted"] / "curves.png") == (1200, 730)
    panels = curves._panels(curves.read_metrics(runs["interrupted"]))
    assert [p["lines"][0][1] for p in panels[:1]] == [[5, 10]]
    # ... and the resumed run's curve is continuous: each step once, the resume marked at step 13
    records = curves.read_metrics(runs["resumed"])
    panels = {p["title"]: p for p in curves._panels(records)}
    assert sorted(panels) == ["eval perplexity", "grad norm (before clipping)", "learning rate", "loss"]
    loss = {line[0]: line[1:3] for line in panels["loss"]["lines"]}
    assert loss["train"][0] == [5, 10, 15, 20] and loss["eval"][0] == [10, 20]
    logged = {r["step"]: r["loss"] for r in read_jsonl(runs["resumed"] / "metrics.jsonl") if "loss" in r}
    assert loss["train"][1] == [logged[s] for s in (5, 10, 15, 20)]
    assert curves.resume_steps(records) == [INTERRUPT_AT]
    assert _png_size(runs["resumed"] / "curves.png") == (1200, 730)


def test_curves_keep_the_last_value_of_a_step_logged_twice(runs, tmp_path):
    """A session killed after logging past its checkpoint logs those steps again when resumed."""
    from llmcli.train import curves

    lines = (runs["resumed"] / "metrics.jsonl").read_text().splitlines()
    stale = [json.dumps({**json.loads(line), "loss": 99.0}) for line in lines if '"loss"' in line and json.loads(line)["step"] == 15]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3] + stale + lines[3:]) + "\n{\"step\": 2")  # + a cut line
    steps, values = curves.series(curves.read_metrics(tmp_path), "loss")
    assert steps == [5, 10, 15, 20] and 99.0 not in values
    assert curves.draw_curves(tmp_path) == tmp_path / "curves.png"
    assert not list(tmp_path.glob(".curves.png.tmp*"))


def test_curves_of_a_classifier_and_of_feedback_metrics(tmp_path):
    from llmcli.train import curves

    records = [{"step": s, "loss": 1 / s, "eval_loss": 2 / s, "eval_accuracy": 0.5 + s / 100, "eval_f1": 0.4 + s / 100,
                "reward": s / 10, "rewards/margins": s / 20, "reward_std": 1.0, "kl": 0.01 * s, "learning_rate": 1e-3}
               for s in range(1, 31)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panels = {p["title"]: [line[0] for line in p["lines"]] for p in curves._panels(records)}
    assert panels == {"loss": ["train (raw)", "train (smoothed)", "eval"], "eval accuracy / F1": ["accuracy", "f1"],
                      "learning rate": ["learning_rate"], "reward": ["reward", "rewards/margins"], "KL": ["kl"]}
    assert _png_size(curves.draw_curves(tmp_path)) == (1200, 1050)  # 5 panels: 3 rows of 2


def test_smoothing_is_a_debiased_ema():
    from llmcli.train.curves import smooth

    values = [4.0, 2.0, 3.0, 1.0]
    w = 0.6
    expected, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = w * avg + (1 - w) * v
        expected.append(avg / (1 - w**i))
    assert smooth(values, w) == pytest.approx(expected, rel=1e-12)
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50, rel=1e-12)


def test_curves_callback_main_process_only_budgeted_and_never_raising(runs, tmp_path, capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llmcli import console
    from llmcli.train.curves import CurvesCallback

    run = tmp_path / "run"
    shutil.copytree(runs["finished"], run, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    args, control = TrainingArguments(output_dir=str(run), report_to="none"), TrainerControl()
    other_rank = TrainerState()
    other_rank.is_world_process_zero = False
    callback = CurvesCallback(every=0, budget=0.0)  # run dir from args.output_dir; no drawing during training after the first
    callback.on_evaluate(args, other_rank, control)
    assert not (run / "curves.png").exists()
    state = TrainerState()
    callback.on_train_begin(args, state, control)
    callback.on_evaluate(args, state, control)
    assert (run / "curves.png").exists() and callback.draws == 1
    callback.on_evaluate(args, state, control)
    callback.on_save(args, state, control)
    assert callback.draws == 1  # over budget: skipped
    callback.on_train_end(args, state, control)
    callback.on_evaluate(args, state, control)  # fit()'s final evaluation comes after train_end: drawn too
    assert callback.draws == 3
    rarely = CurvesCallback(run, every=3600, budget=1.0)  # a run shorter than `every` draws only at the end
    rarely.on_train_begin(args, state, control)
    rarely.on_evaluate(args, state, control)
    rarely.on_save(args, state, control)
    assert rarely.draws == 0
    rarely.on_train_end(args, state, control)
    assert rarely.draws == 1
    # a failure is one warning, not an exception
    console.configure()
    broken = CurvesCallback(tmp_path / "no-such-dir" / "deeper")
    broken.on_train_end(args, state, control)
    broken.on_train_end(args, state, control)
    err = capsys.readouterr().err
    assert err.count("warning: could not draw curves.png") == 1


# --------------------------------------------------------------------------------------------
# report


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def _session_times(run):
    return sum(r["train_runtime"] for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r)


def test_report_json_two_finished_one_interrupted(cli, runs):
    from transformers import AutoModelForCausalLM

    order = [runs["interrupted"], runs["finished"], runs["resumed"]]
    result = cli("report", *order, "--json")
    rows = json.loads(result.stdout)["runs"]
    assert [r["path"] for r in rows] == [str(p) for p in order]
    assert [r["status"] for r in rows] == ["interrupted", "finished", "finished"]
    interrupted, finished, resumed = rows

    summary = _summary(runs["finished"])
    metrics = read_jsonl(runs["finished"] / "metrics.jsonl")
    model = AutoModelForCausalLM.from_pretrained(runs["finished"])
    assert finished["step"] == 20 == summary["global_step"]
    assert finished["tokens"] == 20 * TOKENS_PER_STEP == summary["train_tokens"]
    assert finished["params"] == sum(p.numel() for p in model.parameters())
    assert finished["model"] == "gpt2 2x64" and finished["task"] == "causal-lm"
    assert finished["train_time_s"] == pytest.approx(summary["train_runtime_s"], rel=1e-5)
    assert finished["tokens_per_second"] == pytest.approx(summary["train_tokens_per_second"], rel=1e-5)
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    assert len(evals) == 2
    assert finished["metric"] == "eval_loss" and finished["final"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert finished["best"] == pytest.approx(min(evals), rel=1e-6)
    assert finished["perplexity"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-5)
    assert finished["checkpoint"] == 20 and finished["max_steps"] == 20

    assert interrupted["step"] == INTERRUPT_AT and interrupted["checkpoint"] == INTERRUPT_AT
    assert interrupted["tokens"] == INTERRUPT_AT * TOKENS_PER_STEP
    assert interrupted["train_time_s"] == pytest.approx(_session_times(runs["interrupted"]), rel=1e-5)
    eval10 = next(r["eval_loss"] for r in read_jsonl(runs["interrupted"] / "metrics.jsonl") if "eval_loss" in r)
    assert interrupted["final"] == pytest.approx(eval10, rel=1e-6) == interrupted["best"]

    assert resumed["step"] == 20 and resumed["tokens"] == 20 * TOKENS_PER_STEP
    assert _summary(runs["resumed"])["resumed_from"] == INTERRUPT_AT
    assert resumed["train_time_s"] == pytest.approx(_session_times(runs["resumed"]), rel=1e-5)  # both sessions
    assert resumed["params"] == finished["params"]


def _hold_lock(run_dir):
    """A process that holds `run_dir`'s run lock (an flock), as a training run does, until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from llmcli.train.rundir import RunLock; "
                               "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_report_table_running_failed_and_stale_lock(cli, runs, tmp_path):
    """Running means the run lock is held (asked of the kernel); a lock file nobody holds is stale
    even when the pid it names is alive (reused, or this very process)."""
    def copy(name):
        dest = tmp_path / name
        shutil.copytree(runs["finished"], dest, ignore=shutil.ignore_patterns("checkpoint-*"))
        return dest

    running = copy("running")
    (running / "summary.json").unlink()
    live = _hold_lock(running)
    try:
        failed = copy("failed")
        (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "loss became nan at step 21", "global_step": 20}))
        stale = copy("stale")
        (stale / "summary.json").unlink()
        (stale / ".llmcli.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}))
        rows = json.loads(cli("report", running, failed, stale, "--json").stdout)["runs"]
        assert [r["status"] for r in rows] == ["running", "failed", "interrupted"]
        assert rows[0]["lock"]["pid"] == live.pid and rows[1]["error"] == "loss became nan at step 21"
        table = cli("report", running, failed, stale, runs["interrupted"]).stdout.splitlines()
    finally:
        live.kill()
        live.wait()
    assert table[0].split() == ["run", "model", "params", "task", "steps", "tokens", "time", "tok/s", "metric", "final", "best", "status"]
    assert table[1].endswith(f"running (pid {live.pid})") and " 20/20 " in table[1]
    assert table[2].endswith("failed: loss became nan at step 21")
    assert table[3].endswith("interrupted at step 20 (no checkpoint)")
    assert table[4].endswith(f"interrupted at step {INTERRUPT_AT}") and f" {INTERRUPT_AT}/20 " in table[4]
    assert len(table) == 5


def test_report_sweep_dir_glob_and_bad_paths(cli, runs, tmp_path):
    sweep = tmp_path / "sweep"
    for trial in ("trial-10", "trial-2"):
        shutil.copytree(runs["finished"], sweep / trial, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    (sweep / "study.db").write_text("")
    expected = [str(sweep / "trial-2"), str(sweep / "trial-10")]
    assert [r["path"] for r in json.loads(cli("report", sweep, "--json").stdout)["runs"]] == expected
    assert [r["path"] for r in json.loads(cli("report", f"{sweep}/trial-*", "--json").stdout)["runs"]] == expected
    missing = cli("report", tmp_path / "nope", expect=2)
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run dir"
    assert cli("report", f"{tmp_path}/nope-*", expect=2).stderr.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert "not a run dir" in cli("report", tmp_path / "empty", expect=2).stderr


def test_report_compare_png_and_terminal_plot(cli, runs, tmp_path):
    out = tmp_path / "compare.png"
    result = cli("report", runs["finished"], runs["resumed"], "--output", out, "--plot")
    assert _png_size(out) == (1200, 460)
    text = result.stdout
    assert "training loss" in text and "eval_loss" in text
    assert f"  • {runs['finished']}" in text and f"  x {runs['resumed']}" in text
    assert "\x1b[" not in text  # not a terminal: no colour codes
    assert cli("report", runs["finished"], "--output", tmp_path / "no" / "x.png", expect=2).stderr.startswith("error: --output")
    assert cli("report", runs["finished"], "--json", "--plot", expect=2).stdout == ""


def test_report_never_imports_torch(runs, tmp_path):
    code = (
        "import sys\nfrom llmcli.cli import app\n"
        f"try:\n    app(['report', {str(runs['finished'])!r}, {str(runs['resumed'])!r}, '--output', {str(tmp_path / 'c.png')!r}, '--plot'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_report_watch_until_done_and_ctrl_c(runs, tmp_path):
    # a child inherits an ignored SIGINT (this suite started as a background job: `pytest &`), but not a handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _watch_until_done_and_ctrl_c(runs, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch_until_done_and_ctrl_c(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["finished"], run, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    (run / "summary.json").unlink()
    holder = _hold_lock(run)
    cmd = [sys.executable, "-m", "llmcli", "report", str(run), "--watch", "--interval", "0.2"]
    watch = subprocess.Popen([*cmd, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import select

        # Ctrl-C once the watcher is up and has drawn its first table (a loaded machine may take seconds to start it)
        assert select.select([stopped.stdout], [], [], 120)[0], "report --watch printed nothing"
        time.sleep(0.5)
        assert watch.poll() is None  # still watching: the run is running
        stopped.send_signal(signal.SIGINT)
        _, err = stopped.communicate(timeout=30)
        assert stopped.returncode == 130 and err == ""
    finally:
        holder.kill()
        holder.wait()
    out, err = watch.communicate(timeout=30)  # the holder is gone: the run is interrupted, the watch ends
    assert watch.returncode == 0, err
    assert [r["status"] for r in json.loads(out)["runs"]] == ["interrupted"]


def test_final_line_for_cron(runs):
    from llmcli.report.runinfo import final_line

    summary = _summary(runs["finished"])
    assert final_line("pretrain", runs["finished"], "finished", summary) == (
        f"llmcli: pretrain {runs['finished']} finished step=20 eval_loss={summary['eval_loss']:.6g}"
    )
    eval10 = next(r["eval_loss"] for r in read_jsonl(runs["interrupted"] / "metrics.jsonl") if "eval_loss" in r)
    assert final_line("pretrain", runs["interrupted"], "interrupted", None) == (
        f"llmcli: pretrain {runs['interrupted']} interrupted step={INTERRUPT_AT} eval_loss={eval10:.6g}"
    )


# --------------------------------------------------------------------------------------------
# The engine side: trackers, the cron line, failed runs


def test_tensorboard_writes_the_loss_under_the_run_dir(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "training.max_steps=10",
                          "training.report_to=tensorboard"), "-o", out)
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and not (Path.cwd() / "runs" / "tb").exists()
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e["step"]: e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e}
    assert {s.step: round(s.value, 5) for s in acc.Scalars("train/loss")} == {k: round(v, 5) for k, v in logged.items()}


def test_quiet_runs_end_with_one_line_for_cron(cli, tmp_path):
    out = tmp_path / "q"
    result = cli("pretrain", "--quiet", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}",
                                              "training.max_steps=4", "training.eval_strategy=steps", "training.eval_steps=4"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and result.stdout == ""
    assert result.stderr == f"llmcli: pretrain {out} finished step=4 eval_loss={summary['eval_loss']:.6g}\n"


def test_a_failed_run_says_so_in_its_summary_and_the_cron_line(cli, tmp_path, monkeypatch):
    from hooks import CALLBACK

    out = tmp_path / "nan"
    monkeypatch.setenv("HOOK_NAN_AT_STEP", "3")
    result = cli("pretrain", "--quiet", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}",
                                              "training.max_steps=6", CALLBACK), "-o", out, expect=1)
    assert result.stderr.splitlines()[-1] == f"llmcli: pretrain {out} failed step=2"
    report = json.loads(cli("report", out, "--json").stdout)
    assert [(r["status"], r["step"]) for r in report["runs"]] == [("failed", 2)]


def test_a_pruned_trial_and_a_foreign_summary(cli, runs, tmp_path):
    """A sweep trial's summary.json with "pruned": true reads as pruned, not finished; a summary.json
    whose global_step is not a number (hand-edited, another tool's) does not crash the report."""
    pruned, odd = tmp_path / "trial-0003", tmp_path / "odd"
    for dest in (pruned, odd):
        shutil.copytree(runs["finished"], dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = _summary(runs["finished"])
    (pruned / "summary.json").write_text(json.dumps({**summary, "pruned": True, "trial": 3}))
    (odd / "summary.json").write_text(json.dumps({**summary, "global_step": "twenty"}))
    rows = json.loads(cli("report", pruned, odd, "--json").stdout)["runs"]
    assert [r["status"] for r in rows] == ["pruned", "finished"]
    assert rows[0]["final"] == summary["eval_loss"] and rows[1]["step"] == 20
    table = cli("report", pruned).stdout.splitlines()
    assert table[1].split()[-1] == "pruned"
