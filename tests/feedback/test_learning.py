"""RL learns (#22): GRPO through `llmcli finetune` on a tiny GPT-2 with a reward that is trivially
learnable - the share of the letter 'e' in prompt + completion - raises the held-out mean reward;
the same run with the reward's sign flipped lowers the share of 'e'. Seeded, so the numbers repeat."""

import json

import pytest

from conftest import sets


def share_of_e(texts):
    return [t.count("e") / max(1, len(t)) for t in texts]


def less_e(texts):
    return [-v for v in share_of_e(texts)]


@pytest.mark.parametrize("reward, sign", [("share_of_e", 1), ("less_e", -1)])
def test_rl_moves_the_held_out_reward_the_way_the_reward_points(cli, tmp_path, gpt2_run, feedback_files, reward, sign):
    out = tmp_path / reward
    cli("finetune", "--model", gpt2_run, *sets(
        "task=rl", f"data.train_file={feedback_files['prompts']}", f"data.validation_file={feedback_files['prompts_dev']}",
        f"reward.function=test_learning:{reward}", "reward.eval_samples=8", "training.max_steps=30",
        "training.per_device_train_batch_size=16", "training.num_generations=4", "training.learning_rate=1e-2",
        "training.logging_steps=10", "training.report_to=none", "training.curves=false", "training.seed=0",
        "generation.max_new_tokens=8", "generation.min_new_tokens=8"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    e_before, e_after = sign * summary["reward_before"], sign * summary["reward_after"]  # the share of 'e' itself
    # measured: 0.13 -> 0.41 with the reward, 0.13 -> 0.04 against it (32 held-out samples each)
    if sign > 0:
        assert e_after > e_before + 0.15
    else:
        assert e_after < e_before - 0.05
