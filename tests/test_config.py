"""Config loading, `--set` overrides, validation errors, and every shipped config."""

import re

import pytest

from conftest import ROOT
from llmcli.config import load_config
from llmcli.errors import ConfigError

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _command_of(path):
    """The command a shipped config is for: its opening comment runs it."""
    return re.search(r"llmcli (pretrain|finetune|generate|eval|sweep)\b", path.read_text()).group(1)


def test_every_shipped_config_validates():
    llmcli_configs = [p for p in CONFIGS if "accelerate" not in p.parts and not p.name.startswith("sweep-")]
    assert len(llmcli_configs) == 13, llmcli_configs  # update when adding a config
    for path in llmcli_configs:
        load_config(path, command=_command_of(path))  # raises on any unknown key or bad type, TrainingArguments fields included


def test_shipped_configs_open_with_their_run_command():
    for path in CONFIGS:
        if "accelerate" in path.parts:
            continue
        assert path.read_text().startswith("#") and "llmcli " in path.read_text().split("\n\n")[0], path


def test_overrides_are_yaml_scalars():
    cfg = load_config(None, command="finetune", overrides=[
        "training.max_steps=20", "training.learning_rate=5e-4", "model.config_overrides.n_layer=2",
        "data.dataset_name=null", "data.train_file=x.txt", "training.bf16=true", "peft=true",
    ])
    assert cfg.training.max_steps == 20
    assert cfg.training.learning_rate == 5e-4  # PyYAML reads '5e-4' as a string; converted per TrainingArguments
    assert cfg.model.config_overrides == {"n_layer": 2}
    assert cfg.data.dataset_name is None and cfg.data.train_file == "x.txt"
    assert cfg.training.bf16 is True and cfg.peft.r == 8


def test_peft_true_then_a_peft_key():
    cfg = load_config(None, ["peft=true", "peft.merge=false"], command="finetune")
    assert cfg.peft.merge is False and cfg.peft.r == 8


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  block_size: 64\ntraining:\n  max_steps: 5\n")
    cfg = load_config(path, ["data.block_size=32"], command="pretrain")
    assert cfg.data.block_size == 32 and cfg.training.max_steps == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.trian_file=x"], "unknown config key 'data.trian_file' in section 'data' (did you mean 'train_file'?)"),
        (["training.max_step=3"], "unknown config key 'training.max_step': not a TrainingArguments field (did you mean 'max_steps'?)"),
        (["training.max_steps=abc"], "config key 'training.max_steps': expected int, got 'abc'"),
        (["model.vocab_size=abc"], "config key 'model.vocab_size'"),
        (["modle.vocab_size=3"], "unknown config key 'modle' at the top level (did you mean 'model'?)"),
        (["data.block_size=-1"], "config key 'data.block_size': Input should be greater than 0"),
        (["task=xx"], "config key 'task'"),
        (["nodots"], "expected dotted.key=value"),
        (["data.dataset_name=wikitext", "data.train_file=x.txt"], "data.dataset_name and data.train_file/validation_file are both set"),
        (["data.block_size=3", "data.block_size.x=1"], "'data.block_size' is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, command="finetune")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  model_type: gpt2\n data: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:3" in str(err.value) and "YAML syntax error" in str(err.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_config_errors_exit_2_without_traceback(cli, tmp_path):
    result = cli("pretrain", "--set", "data.trian_file=x", "-o", tmp_path, expect=2)
    assert result.stderr.startswith("error: unknown config key 'data.trian_file'")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    result = cli("pretrain", "--config", tmp_path / "nope.yaml", expect=2)
    assert "config file not found" in result.stderr
    result = cli("pretrain", "--set", "data.train_file=x.txt", expect=2)
    assert "training.output_dir" in result.stderr


def test_yaml11_no_is_a_string_for_strategy_fields(tmp_path):
    """`--set training.eval_strategy=no` and `save_strategy: no` in a file mean the string 'no'."""
    cfg = load_config(None, command="pretrain", overrides=["training.save_strategy=no", "training.eval_strategy=no", "data.streaming=yes", "training.bf16=on"])
    assert cfg.training.save_strategy == "no" and cfg.training.eval_strategy == "no"
    assert cfg.data.streaming is True and cfg.training.bf16 is True
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  save_strategy: no\n  logging_strategy: no\n")
    cfg = load_config(path, command="pretrain")
    assert cfg.training.save_strategy == "no" and cfg.training.logging_strategy == "no"
