"""Learning from feedback through `llmcli finetune`: task reward (RewardTrainer), dpo (DPOTrainer)
and rl (GRPOTrainer) end to end on tiny models, kill -9 resume, rewards from a classifier run dir
and from `module:function`, one-line errors for bad preference data, config checks.

The numbers are checked against references computed here with transformers alone."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES, _pairs, _write_jsonl, read_jsonl, sets
from hooks import CALLBACK, hook_env

N_DEV = 19  # pairs in sentiment_dev.jsonl (19 positive x 21 negative sentences)
COMMON = ["training.report_to=none", "training.seed=0", "training.logging_steps=1"]


@pytest.fixture
def files(feedback_files):
    return feedback_files


def start(args, tmp_path, **hooks):
    """The CLI in a subprocess, paused by hooks.TestHooks at a known step (see tests/train/test_rundir.py)."""
    marker = tmp_path / "paused"
    env = hook_env(marker, **hooks)
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args), "--set", CALLBACK], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"run ended before pausing (exit {proc.returncode}): {proc.communicate()[1].decode()}")
        time.sleep(0.05)
    return proc


def _kill9_then_resume(cli, args, out, tmp_path, pause_at):
    proc = start(args, tmp_path, PAUSE_AT_STEP=pause_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "summary.json").exists()
    result = cli(*args)  # the same command again
    assert "stale lock" in result.stderr and "resuming from" in result.stderr
    return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------------------------
# task: reward


def test_reward_model_trains_and_eval_reports_preference_accuracy(cli, tmp_path, gpt2_run, files):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    cli("finetune", "--model", gpt2_run, *sets(*COMMON, "task=reward", f"data.train_file={files['pairs']}",
        f"data.validation_file={files['pairs_dev']}", "training.max_steps=6", "training.per_device_train_batch_size=8",
        "training.per_device_eval_batch_size=32", "training.learning_rate=1e-3", "training.eval_strategy=steps",
        "training.eval_steps=3", "training.save_steps=3"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "reward" and summary["global_step"] == 6 and summary["preference_pairs"] == N_DEV
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "accuracy" in r and "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [3, 6]
    assert (out / "checkpoint-6" / "trainer_state.json").exists() and not (out / ".staging").exists()

    # reference: each text alone (no padding) through the saved model, as TRL built it (prompt + response + EOS)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.id2label == {0: "reward"}
    pairs = read_jsonl(files["pairs"])
    with torch.no_grad():
        def score(text):
            return model(**tok(text + tok.eos_token, return_tensors="pt")).logits[0, 0].item()
        margins = [score(p["prompt"] + p["chosen"]) - score(p["prompt"] + p["rejected"]) for p in pairs]
    result = json.loads(cli("eval", "--model", out, "--data", files["pairs"], "--json").stdout)
    m = result["metrics"]
    assert result["task"] == "reward" and m["preference_pairs"] == 75
    assert m["preference_accuracy"] == sum(x > 0 for x in margins) / 75
    assert m["preference_margin"] == pytest.approx(sum(margins) / 75, rel=1e-5, abs=1e-7)
    # the summary's exact held-out numbers agree with TRL's own eval (one batch holds all the pairs)
    assert summary["preference_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    assert summary["preference_margin"] == pytest.approx(summary["eval_margin"], rel=1e-4, abs=1e-6)
    # a reward model is a reward for rl: its score through reward.model, without a label
    from llmcli.config import load_config
    from llmcli.feedback.rewards import reward_functions

    (reward,) = reward_functions(load_config(None, [f"reward.model={out}"]))
    assert reward(prompts=["review:"], completions=[pairs[0]["chosen"]]) == pytest.approx(
        [score(pairs[0]["prompt"] + pairs[0]["chosen"])], rel=1e-5)


# --------------------------------------------------------------------------------------------
# task: dpo


def _dpo_args(out, model, files, *extra):
    return ["finetune", "--model", model, *sets(*COMMON, "task=dpo", f"data.train_file={files['pairs']}",
            f"data.validation_file={files['pairs_dev']}", "training.max_steps=4", "training.save_steps=2",
            "training.per_device_train_batch_size=4", "training.per_device_eval_batch_size=32", "training.learning_rate=1e-3",
            "training.beta=0.5", "training.eval_strategy=steps", "training.eval_steps=2", "training.eval_on_start=true", *extra),
            "-o", out]


def test_dpo_kill9_resumes_to_the_same_step_with_metrics_from_the_start(cli, tmp_path, gpt2_run, files):
    out = tmp_path / "dpo"
    args = _dpo_args(out, gpt2_run, files)
    summary = _kill9_then_resume(cli, args, out, tmp_path, pause_at=3)
    assert summary["task"] == "dpo" and summary["resumed_from"] == 2 and summary["global_step"] == 4
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # cut back to checkpoint-2, no duplicates
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/chosen"):
        assert all(key in r for r in evals)
    # step 0: policy == reference, so every implicit reward is 0; the log-probs are the start model's,
    # recomputed here: sum of log p(response + EOS | prompt), averaged over the held-out pairs
    start = evals[0]
    assert start["eval_rewards/margins"] == 0 and start["eval_rewards/accuracies"] == 0
    chosen, rejected = _response_logps(gpt2_run, read_jsonl(files["pairs_dev"]))
    assert len(chosen) == N_DEV
    assert start["eval_logps/chosen"] == pytest.approx(sum(chosen) / N_DEV, rel=1e-4)
    assert start["eval_logps/rejected"] == pytest.approx(sum(rejected) / N_DEV, rel=1e-4)
    assert evals[-1]["eval_rewards/margins"] != 0


def _response_logps(model_dir, pairs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = ([], [])
    with torch.no_grad():
        for p in pairs:
            prompt = tok(p["prompt"])["input_ids"]
            for i, key in enumerate(("chosen", "rejected")):
                ids = tok(p["prompt"] + p[key] + tok.eos_token)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
                target = torch.tensor(ids[1:])
                out[i].append(logp.gather(-1, target[:, None])[len(prompt) - 1 :].sum().item())
    return out


def test_dpo_with_lora_saves_adapter_and_merged_model(cli, tmp_path, gpt2_run, files):
    out = tmp_path / "dpo-lora"
    result = cli(*_dpo_args(out, gpt2_run, files, "training.max_steps=2", "training.eval_on_start=false", "peft.r=4"))
    assert "LoRA r=4" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "dpo" and summary["global_step"] == 2 and "eval_rewards/accuracies" in summary
    assert (out / "adapter_config.json").exists() and (out / "merged" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------
# task: rl


def _rl_args(out, model, files, *extra):
    return ["finetune", "--model", model, *sets(*COMMON, "task=rl", f"data.train_file={files['prompts']}",
            f"data.validation_file={files['prompts_dev']}", "training.max_steps=4", "training.save_steps=2",
            "training.per_device_train_batch_size=8", "training.num_generations=4", "training.learning_rate=1e-3",
            "training.beta=0.1", "generation.max_new_tokens=6", "generation.min_new_tokens=3", *extra), "-o", out]


def test_rl_with_a_classifier_reward_resumes_after_kill9(cli, tmp_path, gpt2_run, classifier_run, files):
    out = tmp_path / "rl"
    args = _rl_args(out, gpt2_run, files, f"reward.model={classifier_run}", "reward.label=positive")
    summary = _kill9_then_resume(cli, args, out, tmp_path, pause_at=3)
    assert summary["task"] == "rl" and summary["resumed_from"] == 2 and summary["global_step"] == 4
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # every logging step: mean reward, KL, completion length (at least min_new_tokens)
        assert {"reward", "rewards/p_positive/mean", "kl", "completions/mean_length"} <= set(r)
        assert 3 <= r["completions/min_length"] <= r["completions/mean_length"] <= 6
    assert records[0]["kl"] == 0  # before the first update the policy is the reference (dropout off)
    # before/after on the 4 eval prompts; every sample's reward is the classifier's P(positive) of prompt + completion
    for when in ("before", "after"):
        samples = read_jsonl(out / f"samples_{when}.jsonl")
        assert len(samples) == 4 and all(3 <= s["completion_tokens"] <= 6 for s in samples)
        probs = _p_positive(classifier_run, [s["prompt"] + s["completion"] for s in samples])
        assert [s["reward"] for s in samples] == pytest.approx(probs, rel=1e-5)
        assert summary[f"reward_{when}"] == pytest.approx(sum(probs) / 4, rel=1e-5)
    assert summary["kl_before"] == 0 and summary["kl_after"] > 0 and summary["ref_perplexity_after"] > 1


def _p_positive(model_dir, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return [torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1)[model.config.label2id["positive"]].item()
                for t in texts]


CALLS = []


def recording_reward(texts):
    """A `module:function` reward: the share of 'e' letters; every call is recorded for the test."""
    values = [t.count("e") / max(1, len(t)) for t in texts]
    CALLS.append((list(texts), values))
    return values


def test_rl_with_a_function_reward_logs_what_the_function_returned(cli, tmp_path, gpt2_run, files):
    CALLS.clear()
    out = tmp_path / "rl-fn"
    cli(*_rl_args(out, gpt2_run, files, "reward.function=test_feedback:recording_reward", "training.max_steps=3"))
    summary = json.loads((out / "summary.json").read_text())
    # calls: the 4 eval prompts before training, one batch of 8 completions per step, the eval prompts after
    assert [len(texts) for texts, _ in CALLS] == [4, 8, 8, 8, 4]
    prompts = {r["prompt"] for r in read_jsonl(files["prompts"])}
    assert all(any(t.startswith(p) for p in prompts) for texts, _ in CALLS[1:4] for t in texts)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    for r, (_, values) in zip(records, CALLS[1:4]):
        assert r["reward"] == pytest.approx(sum(values) / 8, rel=1e-5)
        assert r["rewards/recording_reward/mean"] == pytest.approx(sum(values) / 8, rel=1e-5)
    assert summary["reward_before"] == pytest.approx(sum(CALLS[0][1]) / 4, rel=1e-9)
    assert summary["reward_after"] == pytest.approx(sum(CALLS[-1][1]) / 4, rel=1e-9)


def test_rl_dry_run_takes_sampling_from_the_generation_section(cli, tmp_path, gpt2_run, files):
    import yaml

    result = cli(*_rl_args(tmp_path / "dry", gpt2_run, files, "reward.function=test_feedback:recording_reward",
                           "generation.temperature=0.7", "generation.top_k=20"), "--dry-run")
    training = yaml.safe_load(result.stdout)["training"]
    assert training["temperature"] == 0.7 and training["top_k"] == 20 and training["max_completion_length"] == 6
    assert training["generation_kwargs"] == {"min_new_tokens": 3}
    assert training["gradient_checkpointing"] is False and training["disable_dropout"] is True
    assert not (tmp_path / "dry").exists()


# --------------------------------------------------------------------------------------------
# Bad data and config: one line, documented exit codes


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": " b", "rejected": " c"}], "{f}:1: no 'chosen' field (data.chosen_column); the row has: prompt, answer, rejected"),
    ([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " b", "rejected": "  "}], "{f}:2: 'rejected' is empty"),
    ([{"prompt": "a", "chosen": " b", "rejected": [{"role": "assistant", "content": "c"}]}],
     "{f}:1: mixed row types ('chosen' is text, 'rejected' is conversation, 'prompt' is text); "
     "use text for all fields or conversations for all"),
    ([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": 3, "rejected": " c"}],
     "{f}:2: 'chosen' must be text or a list of {{role, content}} messages, got int"),
])
def test_bad_preference_rows_fail_with_one_line_and_exit_4(cli, tmp_path, gpt2_run, rows, message):
    f = _write_jsonl(tmp_path / "bad.jsonl", [*rows, {"prompt": "x", "chosen": " y", "rejected": " z"}])
    result = cli("finetune", "--model", gpt2_run, *sets("task=dpo", f"data.train_file={f}"), "-o", tmp_path / "r", expect=4)
    assert result.stderr.strip().splitlines() == ["error: " + message.format(f=f)]
    assert not (tmp_path / "r").exists()  # checked before anything is written


def test_missing_column_names_the_key(cli, tmp_path, gpt2_run, files):
    result = cli("finetune", "--model", gpt2_run, *sets("task=reward", f"data.train_file={files['pairs']}",
                 "data.chosen_column=good"), "-o", tmp_path / "r", "--dry-run", expect=4)
    assert result.stderr.strip() == f"error: {files['pairs']}:1: no 'good' field (data.chosen_column); the row has: prompt, chosen, rejected"


@pytest.mark.parametrize("extra, code, message", [
    (["reward.lable=positive"], 2, "unknown config key 'reward.lable' in section 'reward' (did you mean 'label'?)"),
    ([], 2, "task: rl needs a reward"),
    (["reward.function=test_feedback:recording_reward", "training.temperature=0.5"], 2,
     "training.temperature: task rl samples with generation.temperature; set it there"),
    (["reward.function=test_feedback:recording_reward", "training.num_generatons=4"], 2,
     "unknown config key 'training.num_generatons': not a GRPOConfig field (did you mean 'num_generations'?)"),
    (["reward.function=nowhere:nothing"], 2, "reward.function: cannot import 'nowhere:nothing'"),
    # completions reused across optimizer steps: a checkpoint between them cannot resume exactly
    (["reward.function=test_feedback:recording_reward", "training.num_iterations=2"], 2,
     "reuse one batch of completions for 2 micro-steps, not one optimizer step (1)"),
    (["reward.function=test_feedback:recording_reward", "training.gradient_accumulation_steps=2", "training.steps_per_generation=4"], 2,
     "reuse one batch of completions for 4 micro-steps, not one optimizer step (2)"),
    (["reward.function=test_feedback:recording_reward", "training.generation_batch_size=32"], 2,
     "reuse one batch of completions for 4 micro-steps, not one optimizer step (1)"),
    (["reward.function=test_feedback:recording_reward", "training.gradient_accumulation_steps=2", "training.steps_per_generation=2"], 0, ""),
])
def test_rl_config_errors(cli, tmp_path, gpt2_run, files, extra, code, message):
    result = cli("finetune", "--model", gpt2_run, *sets("task=rl", f"data.train_file={files['prompts']}", *extra),
                 "-o", tmp_path / "r", "--dry-run", expect=code)
    if code:
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    else:  # one generation per optimizer step of 2 micro-batches: allowed
        assert "dry run: nothing was trained" in result.stderr


def test_reward_section_is_only_for_rl_and_dpo_checks_dpo_keys(cli, tmp_path, gpt2_run, files):
    base = ["finetune", "--model", gpt2_run, "-o", tmp_path / "r", "--dry-run"]
    result = cli(*base, *sets("task=dpo", f"data.train_file={files['pairs']}", "reward.label=x"), expect=2)
    assert "config section 'reward' is read only by task: rl (this run is task: dpo)" in result.stderr
    result = cli(*base, *sets("task=dpo", f"data.train_file={files['pairs']}", "training.betta=0.2"), expect=2)
    assert "not a DPOConfig field (did you mean 'beta'?)" in result.stderr
    result = cli(*base, *sets("task=dpo", f"data.train_file={files['pairs']}", "training.beta=0.2"))
    assert "beta: 0.2" in result.stdout


def test_reward_model_settings_are_checked_before_the_run(cli, tmp_path, gpt2_run, classifier_run, files):
    base = ["finetune", "--model", gpt2_run, "-o", tmp_path / "r", "--dry-run"]
    rl = ["task=rl", f"data.train_file={files['prompts']}"]
    result = cli(*base, *sets(*rl, f"reward.model={classifier_run}", "reward.label=happy"), expect=2)
    assert result.stderr.strip() == f"error: reward.label: 'happy' is not a label of {classifier_run} (labels: negative, positive)"
    result = cli(*base, *sets(*rl, f"reward.model={classifier_run}"), expect=2)
    assert "is a classifier; name the label whose probability is the reward (one of negative, positive)" in result.stderr
    result = cli(*base, *sets(*rl, f"reward.model={gpt2_run}", "reward.label=positive"), expect=2)
    assert f"reward.model: {gpt2_run} is a causal-lm model" in result.stderr


def test_conversational_pairs_need_a_chat_template_and_train_a_reward_model(cli, tmp_path, gpt2_run):
    import shutil

    conv = [{"prompt": [{"role": "user", "content": "a review, please"}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in _pairs(read_jsonl(FIXTURES / 'sentiment_train.jsonl'))]
    f = _write_jsonl(tmp_path / "conv.jsonl", conv)
    args = ["finetune", *sets(*COMMON, "task=reward", f"data.train_file={f}", "data.validation_split_percentage=20",
            "training.max_steps=2", "training.per_device_eval_batch_size=32")]
    result = cli(*args, "--model", gpt2_run, "-o", tmp_path / "no-template", expect=4)
    assert not (tmp_path / "no-template").exists()
    assert result.stderr.strip() == ("error: the rows are conversations (lists of messages) but the tokenizer has no chat "
                                     "template; use text rows or a model whose tokenizer has one")
    model = tmp_path / "chat-gpt2"
    shutil.copytree(gpt2_run, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    out = tmp_path / "rm"
    result = cli(*args, "--model", model, "-o", out)
    assert "reward: 60 preference pairs (conversations), 15 held out" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # the held-out pairs scored through the chat template, as TRL's own evaluation scored them
    assert summary["preference_pairs"] == 15
    assert summary["preference_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
    assert summary["preference_margin"] == pytest.approx(summary["eval_margin"], rel=1e-4, abs=1e-7)


def test_rl_resumed_after_kill9_equals_an_uninterrupted_run(cli, tmp_path, gpt2_run, files):
    """Killed at step 3 (checkpoint 2 on disk), the same command again logs the same loss, reward and
    KL at every step as a run that was never killed, and the same held-out reward after training:
    sampling resumes from the checkpoint's RNG state and the sampler's position."""
    extra = ("reward.function=hooks:share_of_e", "training.max_steps=5")
    whole = tmp_path / "whole"
    cli(*_rl_args(whole, gpt2_run, files, *extra))
    out = tmp_path / "killed"
    summary = _kill9_then_resume(cli, _rl_args(out, gpt2_run, files, *extra), out, tmp_path, pause_at=3)
    assert summary["resumed_from"] == 2 and summary["global_step"] == 5
    runs = [[r for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (whole, out)]
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[0]] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward", "kl", "completions/mean_length"):
        assert [r[key] for r in runs[1]] == pytest.approx([r[key] for r in runs[0]], rel=1e-5, abs=1e-9), key
    assert summary["reward_after"] == pytest.approx(json.loads((whole / "summary.json").read_text())["reward_after"], rel=1e-5)
