"""The reward API of task rl (#22): rewards see the rows' other columns and combine with weights,
a scoring model judges the completion (long texts cut from the left; none cut where the model has
no context limit; conversations in its chat template), and the before/after samples use exactly
the sampling GRPO trains with."""

import json

import pytest
import yaml

from conftest import read_jsonl, sets

ANSWERS = {}
CALLS = {"mentions_answer": [], "completion_length": []}


def mentions_answer(texts, answer, prompts):
    """A verifiable reward: 1 when the row's `answer` column appears in prompt + completion."""
    CALLS["mentions_answer"].append((list(prompts), list(answer)))
    return [float(a in t) for t, a in zip(texts, answer)]


def completion_length(texts, completions):
    CALLS["completion_length"].append(list(completions))
    return [len(c) / 10 for c in completions]


@pytest.fixture
def answer_prompts(tmp_path, feedback_files):
    out = {}
    for split in ("prompts", "prompts_dev"):
        rows = read_jsonl(feedback_files[split])
        for r in rows:
            r["answer"] = ANSWERS.setdefault(r["prompt"], "e" if len(r["prompt"]) % 2 else "a")
        out[split] = tmp_path / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_weighted_rewards_with_extra_columns(cli, tmp_path, gpt2_run, answer_prompts):
    for calls in CALLS.values():
        calls.clear()
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump({
        "task": "rl",
        "data": {"train_file": str(answer_prompts["prompts"]), "validation_file": str(answer_prompts["prompts_dev"])},
        "reward": [{"function": "test_rewards:mentions_answer", "weight": 1.0},
                   {"function": "test_rewards:completion_length", "weight": 0.5}],
        "generation": {"max_new_tokens": 6, "min_new_tokens": 3},
        "training": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "logging_steps": 1,
                     "report_to": "none", "curves": False, "seed": 0},
    }))
    out = tmp_path / "rl"
    cli("finetune", "--config", config, "--model", gpt2_run, "-o", out)
    # every call got each completion's own row's answer: the 4 eval prompts before, 8 completions a step, 4 after
    calls = CALLS["mentions_answer"]
    assert [len(p) for p, _ in calls] == [4, 8, 8, 4]
    assert all(a == ANSWERS[p] for prompts, answers in calls for p, a in zip(prompts, answers))
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    for r in records:  # GRPO's reward is the weighted sum; each reward logged under its own name
        assert r["reward"] == pytest.approx(r["rewards/mentions_answer/mean"] + 0.5 * r["rewards/completion_length/mean"], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    samples = read_jsonl(out / "samples_before.jsonl")
    assert all(s["answer"] == ANSWERS[s["prompt"]] for s in samples)
    for s in samples:
        expected = float(s["answer"] in s["prompt"] + s["completion"]) + 0.5 * len(s["completion"]) / 10
        assert s["reward"] == pytest.approx(expected, rel=1e-9) and set(s["rewards"]) == {"mentions_answer", "completion_length"}
    assert summary["reward_before"] == pytest.approx(sum(s["reward"] for s in samples) / 4, rel=1e-9)
    assert summary["reward_mentions_answer_before"] == pytest.approx(
        sum(float(s["answer"] in s["prompt"] + s["completion"]) for s in samples) / 4, rel=1e-9)
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["reward_weights"] == [1.0, 0.5]


def test_reward_weights_come_from_the_reward_list(cli, tmp_path, gpt2_run, feedback_files):
    result = cli("finetune", "--model", gpt2_run, *sets("task=rl", f"data.train_file={feedback_files['prompts']}",
                 "reward.function=test_rewards:completion_length", "training.reward_weights=[2.0]"), "-o", tmp_path / "x", expect=2)
    assert "training.reward_weights: task rl takes the weights from the reward: list (reward[].weight)" in result.stderr


def _p_positive_of_ids(model, ids, index):
    import torch

    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)[index].item()


def test_a_long_text_is_cut_from_the_left_and_warned_once(classifier_run, capfd):
    from llmcli.config import ModelSection
    from llmcli.feedback.rewards import ModelReward

    reward = ModelReward(str(classifier_run), "positive", 8, ModelSection())
    prompt, completion = "a dull , tedious , boring review " * 30, " a wonderful film"
    short = ["a good film", " indeed"]
    values = reward([prompt, short[0]], [completion, short[1]])
    tok, model = reward.tokenizer, reward.model
    ids = tok(prompt + completion)["input_ids"]
    assert len(ids) > 128  # the tiny BERT's context
    kept = [ids[0], *ids[1:-1][-(128 - 2):], ids[-1]]  # [CLS] + the last 126 tokens + [SEP]
    index = model.config.label2id["positive"]
    assert values[0] == pytest.approx(_p_positive_of_ids(model, kept, index), rel=1e-5)
    assert values[1] == pytest.approx(_p_positive_of_ids(model, tok("".join(short))["input_ids"], index), rel=1e-5)
    reward([prompt], [completion])
    err = capfd.readouterr().err
    assert err.count("longer than the scoring model's context") == 1 and "1 of 2 texts" in err


def test_a_model_without_a_context_limit_reads_the_whole_text(cli, tmp_path, feedback_files):
    """A GRU classifier's max_position_embeddings is a default window, not a limit: nothing is cut."""
    from conftest import FIXTURES
    from llmcli.config import ModelSection
    from llmcli.feedback.rewards import ModelReward

    from test_every_architecture import GRU

    lm = tmp_path / "gru"
    cli("pretrain", *sets(*GRU, "training.max_steps=2"), "-o", lm)
    clf = tmp_path / "clf"
    cli("finetune", "--model", lm, *sets(f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}", "data.label_column=sentiment",
        "training.max_steps=2", "training.report_to=none", "training.curves=false"), "-o", clf)
    reward = ModelReward(str(clf), "positive", 8, ModelSection())
    text = (FIXTURES / "shakespeare_small.txt").read_text()[:1200]  # varied text: a state that does not settle
    ids = reward.tokenizer(text)["input_ids"]
    assert len(ids) > reward.model.config.max_position_embeddings
    seen = []
    reward.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    value = reward([text[:10]], [text[10:]])[0]
    assert seen == [len(ids)]  # every token read
    assert value == pytest.approx(_p_positive_of_ids(reward.model, ids, reward.model.config.label2id["positive"]), rel=1e-5)


def test_conversations_are_scored_in_the_models_chat_template():
    from llmcli.feedback.rewards import ModelReward

    class Tokenizer:
        chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

        def apply_chat_template(self, messages, tokenize=False):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    reward = ModelReward.__new__(ModelReward)  # the scoring model itself is not the point here
    reward.tokenizer = Tokenizer()
    seen = []
    reward.score = lambda texts, add_eos=True: seen.append((texts, add_eos)) or [0.0] * len(texts)
    prompt = [{"role": "user", "content": "review?"}]
    reward([prompt], [[{"role": "assistant", "content": "great"}]])
    assert seen == [(["<user>review?<assistant>great"], False)]  # the template ends turns itself: no EOS added
    reward(["plain "], ["text"])
    assert seen[-1] == (["plain text"], True)


def test_before_and_after_samples_use_grpos_sampling(tmp_path):
    """One source: what GRPO samples with (its GRPOConfig) is what policy_eval passes to generate."""
    import torch
    from trl import GRPOConfig

    from llmcli.config import load_config
    from llmcli.feedback.setup import check_config
    from llmcli.generate.generate import generate_kwargs
    from llmcli.tasks import Task

    class Tok:
        pad_token_id = 0

    for extra in (["generation.max_new_tokens=12"], ["training.max_completion_length=9"]):
        cfg = load_config(None, ["task=rl", "reward.function=test_rewards:completion_length", "generation.temperature=0.7",
                                 "generation.top_k=20", "generation.top_p=0.9", "generation.min_p=0.05",
                                 "generation.repetition_penalty=1.1", "generation.min_new_tokens=3", *extra])
        check_config(cfg, Task.RL)
        args = {**cfg.training_arguments(), "output_dir": str(tmp_path), "bf16": False, "use_cpu": True}
        grpo = GRPOConfig(**args)
        sampled = generate_kwargs(Tok(), cfg.generation, torch.ones(1, 3))
        assert (grpo.temperature, grpo.top_k, grpo.top_p, grpo.min_p, grpo.repetition_penalty) == (
            sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["min_p"], sampled["logits_processor"][0].penalty)
        assert grpo.max_completion_length == sampled["max_new_tokens"] == (12 if "generation" in extra[0] else 9)
        assert grpo.generation_kwargs == {"min_new_tokens": cfg.generation.min_new_tokens}
