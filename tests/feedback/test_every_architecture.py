"""Every feedback task on every architecture llmcli trains (#22): reward, dpo and rl with a KL penalty
on a 2-layer GRU with dropout (and GPT-2), with and without LoRA. The reference is llmcli's copy of
the starting model (TRL's own loader crashed on the GRU), and dropout off means off, the GRU's
between-layer dropout included: before the first update the policy *is* the reference, so the first
step's KL and DPO's implicit rewards are exactly 0."""

import json

import pytest

from conftest import FIXTURES, read_jsonl, sets

COMMON = ["training.report_to=none", "training.seed=0", "training.logging_steps=1", "training.curves=false"]
GRU = [  # two layers, so nn.GRU's own between-layer dropout is live in train mode
    "task=causal-lm", "model.model_type=gru", "model.config_overrides.hidden_size=32", "model.config_overrides.num_layers=2",
    "model.config_overrides.dropout=0.1", "model.config_overrides.max_position_embeddings=64", "model.vocab_size=300",
    "data.block_size=32", "training.per_device_train_batch_size=8", "training.learning_rate=1e-2", "training.max_steps=20",
    "training.save_steps=1000", "training.seed=0", "training.curves=false", f"data.train_file={FIXTURES / 'shakespeare_small.txt'}",
]


@pytest.fixture(scope="module")
def gru_lm(tmp_path_factory):
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = tmp_path_factory.mktemp("gru") / "lm"
    result = CliRunner().invoke(app, ["pretrain", *sets(*GRU), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def base(request, gru_lm, gpt2_run):
    return {"gru": gru_lm, "gpt2": gpt2_run}[request.param]


def reward_share_of_e(texts):
    return [t.count("e") / max(1, len(t)) for t in texts]


def test_disable_dropout_reaches_the_grus_own_dropout(gru_lm):
    """TRL's disable_dropout sets nn.Dropout modules only; nn.GRU's between-layer dropout is a number."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmcli.models
    from llmcli.feedback.reference import disable_dropout

    llmcli.models.register()
    model = AutoModelForCausalLM.from_pretrained(gru_lm).train()
    ids = torch.arange(1, 30)[None]
    torch.manual_seed(0)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
    disable_dropout(model)
    assert model.model.gru.dropout == 0.0
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("base, lora", [("gru", False), ("gru", True), ("gpt2", True)], indirect=["base"])
def test_rl_with_a_kl_penalty(cli, tmp_path, base, lora, feedback_files, monkeypatch):
    from llmcli.feedback import setup

    references = []
    measure = setup.policy_eval

    def recording(policy, *args, ref_model=None, **kwargs):
        references.append((policy, ref_model))
        return measure(policy, *args, ref_model=ref_model, **kwargs)

    monkeypatch.setattr(setup, "policy_eval", recording)
    out = tmp_path / "rl"
    cli("finetune", "--model", base, *sets(*COMMON, "task=rl", f"data.train_file={feedback_files['prompts']}",
        f"data.validation_file={feedback_files['prompts_dev']}", "reward.function=test_every_architecture:reward_share_of_e",
        "training.max_steps=3", "training.per_device_train_batch_size=8", "training.num_generations=4",
        "training.learning_rate=1e-2", "training.beta=0.1", "generation.max_new_tokens=6", "generation.min_new_tokens=3",
        *(["peft.r=4"] if lora else [])), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 3
    kl = [r["kl"] for r in read_jsonl(out / "metrics.jsonl") if "kl" in r and "loss" in r]
    assert len(kl) == 3 and kl[0] == 0.0 and kl[2] > 0  # the first step samples and scores with the start itself
    # before and after are measured against a reference that is not the policy: 0 before, > 0 after training
    (before_policy, before_ref), (_, after_ref) = references
    assert before_ref is not None and before_ref is not before_policy and after_ref is not None
    assert summary["kl_before"] == 0 and summary["kl_after"] > 0
    assert summary["ref_perplexity_before"] > 1 and summary["ref_perplexity_after"] > 1
    assert (out / "adapter_config.json").exists() == lora and (out / "merged" / "config.json").exists() == lora
    # the run's main number is the task's: the held-out reward after training, not the last batch's
    row = json.loads(cli("report", out, "--json").stdout)["runs"][0]
    assert row["metric"] == "reward_after" and row["final"] == summary["reward_after"] and row["greater_is_better"]


@pytest.mark.parametrize("base, lora", [("gru", False), ("gru", True)], indirect=["base"])
def test_dpo_starts_from_the_reference(cli, tmp_path, base, lora, feedback_files):
    out = tmp_path / "dpo"
    cli("finetune", "--model", base, *sets(*COMMON, "task=dpo", f"data.train_file={feedback_files['pairs']}",
        "training.max_steps=2", "training.per_device_train_batch_size=4", "training.learning_rate=1e-2", "training.beta=0.5",
        *(["peft.r=4"] if lora else [])), "-o", out)
    first, second = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    # DPO's implicit rewards are beta * (log p_policy - log p_reference): exactly 0 before the first update
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margins"] == 0
    assert second["rewards/margins"] != 0
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("base, lora", [("gru", False), ("gru", True), ("gpt2", True)], indirect=["base"])
def test_reward_model(cli, tmp_path, base, lora, feedback_files):
    out = tmp_path / "rm"
    cli("finetune", "--model", base, *sets(*COMMON, "task=reward", f"data.train_file={feedback_files['pairs']}",
        f"data.validation_file={feedback_files['pairs_dev']}", "training.max_steps=3", "training.per_device_train_batch_size=8",
        "training.learning_rate=1e-2", *(["peft.r=4"] if lora else [])), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["preference_pairs"] == 19
    result = json.loads(cli("eval", "--model", out, "--data", feedback_files["pairs_dev"], "--json").stdout)
    assert result["task"] == "reward"
    assert result["metrics"]["preference_accuracy"] == summary["preference_accuracy"]
    assert result["metrics"]["preference_margin"] == pytest.approx(summary["preference_margin"], rel=1e-5, abs=1e-7)
