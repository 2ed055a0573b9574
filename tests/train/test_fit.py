"""The training seam: any Trainer subclass with its own arguments class gets a complete run dir;
the seed is the schema's, and user callbacks plug in through `training.callbacks`."""

import json

import pytest

from conftest import FIXTURES, TINY_GPT2, read_jsonl, sets
from llmcli.config import load_config
from llmcli.errors import ConfigError

TEXT = FIXTURES / "shakespeare_small.txt"


def test_trl_sft_trainer_through_fit_gets_a_complete_run_dir(tmp_path, gpt2_run):
    """TRL's SFTTrainer with its SFTConfig, plugged into llmcli's `fit`: staged checkpoints,
    metrics.jsonl, summary.json, final model, and `training:` keys checked against SFTConfig."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from llmcli.data import tokenization
    from llmcli.train import fit
    from llmcli.train.rundir import RunDir
    from llmcli.tasks import Task

    out = tmp_path / "sft"
    overrides = [f"training.output_dir={out}", "training.max_steps=4", "training.save_steps=2", "training.logging_steps=1",
                 "training.per_device_train_batch_size=4", "training.gradient_checkpointing=false",
                 "training.eval_strategy=steps", "training.eval_steps=2", "training.report_to=none", "training.curves=false"]
    cfg = load_config(None, overrides)
    from llmcli.config import TrainingSection
    from llmcli.tasks import check_training_keys

    # SFTConfig's own fields (max_length) pass the same check that TrainingArguments' do
    sft_keys = {**cfg.training.model_dump(), "max_length": "32"}
    cfg.training = TrainingSection.model_validate(check_training_keys(sft_keys, SFTConfig))
    assert cfg.training.max_length == 32  # converted per SFTConfig's declared type
    with pytest.raises(ConfigError, match="not a SFTConfig field"):
        check_training_keys({"max_lenght": 3}, SFTConfig)

    tokenizer = tokenization.load_tokenizer_for(str(gpt2_run), cfg.model)
    model = AutoModelForCausalLM.from_pretrained(gpt2_run)
    lines = [line for line in TEXT.read_text().splitlines() if line.strip()]
    datasets = DatasetDict(train=Dataset.from_dict({"text": lines[:64]}), validation=Dataset.from_dict({"text": lines[64:80]}))
    with RunDir(cfg) as run:
        summary = fit.fit(run, cfg, model, tokenizer, datasets, None, Task.CAUSAL_LM, trainer_cls=SFTTrainer, args_cls=SFTConfig)

    assert summary["global_step"] == 4 and "eval_loss" in summary and summary["perplexity"] > 1
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".staging").exists() and (out / "checkpoint-4" / "trainer_state.json").exists()
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e] == [1, 2, 3, 4]
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert not (out / ".llmcli.lock").exists()


def test_seed_zero_is_kept_and_differs_from_42(cli, tmp_path):
    """`training.seed: 0` seeds the model init with 0 (not 42) and is recorded as 0."""
    from safetensors.torch import load_file

    weights = {}
    for seed in (0, 42):
        out = tmp_path / f"s{seed}"
        cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=1", f"training.seed={seed}",
                              "training.learning_rate=1e-12"), "-o", out)
        assert load_config(out / "config.yaml").training.seed == seed
        weights[seed] = load_file(out / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    assert not (weights[0] == weights[42]).all()


def test_user_callbacks_must_be_trainer_callbacks(cli, tmp_path):
    result = cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=1",
                                   "training.callbacks=[json:JSONDecoder]"), "-o", tmp_path / "r", expect=2)
    assert "training.callbacks: 'json:JSONDecoder' is not a transformers.TrainerCallback class" in result.stderr
    result = cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=1",
                                   "training.callbacks=[nope.module:X]"), "-o", tmp_path / "r2", expect=2)
    assert "cannot import 'nope.module:X'" in result.stderr


@pytest.mark.gpu
def test_cuda_runs_default_to_bf16_and_tf32_and_save_a_model(cli, tmp_path):
    """On a GPU, bf16/tf32 are on unless the config says otherwise, and the run still saves a loadable model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gpu"
    cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=4"), "-o", out)
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4
    from llmcli.train import fit

    cfg = load_config(out / "config.yaml")
    built = fit.training_arguments(cfg, has_eval=False)
    assert built.bf16 is True and built.tf32 is True
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
