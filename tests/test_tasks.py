"""Task resolution (one resolver, one vocabulary) and the sections each command reads."""

import pytest

from conftest import FIXTURES, TINY_GPT2, sets
from llmcli.config import load_config
from llmcli.errors import ConfigError
from llmcli.models.heads import default_lm_task, task_of_model
from llmcli.tasks import DataFormat, Task
from llmcli.tasks import resolve_task as resolve


def resolve_task(requested, command, model_type, *rest):
    """The resolver as the commands call it: the model type's own LM objective asked lazily."""
    return resolve(requested, command, lambda: default_lm_task(model_type), *rest)


@pytest.mark.parametrize(
    "requested, command, model_type, columns, prompt_set, label_set, expected",
    [
        ("auto", "pretrain", "gpt2", None, False, False, (Task.CAUSAL_LM, DataFormat.TEXT)),
        ("auto", "pretrain", "bert", None, False, False, (Task.MASKED_LM, DataFormat.TEXT)),
        ("auto", "pretrain", "roberta", None, False, False, (Task.MASKED_LM, DataFormat.TEXT)),
        ("auto", "pretrain", "llama", None, False, False, (Task.CAUSAL_LM, DataFormat.TEXT)),
        ("causal-lm", "pretrain", "bert", None, False, False, (Task.CAUSAL_LM, DataFormat.TEXT)),
        ("auto", "finetune", "bert", ["sentence", "label"], False, False, (Task.CLASSIFICATION, DataFormat.LABELLED)),
        ("auto", "finetune", "gpt2", ["text", "labels"], False, False, (Task.CLASSIFICATION, DataFormat.LABELLED)),
        ("auto", "finetune", "gpt2", ["review", "stars"], False, True, (Task.CLASSIFICATION, DataFormat.LABELLED)),
        ("auto", "finetune", "gpt2", ["prompt", "completion"], False, False, (Task.CAUSAL_LM, DataFormat.PROMPT_COMPLETION)),
        ("auto", "finetune", "gpt2", ["q", "a", "label"], True, False, (Task.CAUSAL_LM, DataFormat.PROMPT_COMPLETION)),
        ("auto", "finetune", "gpt2", ["text"], False, False, (Task.CAUSAL_LM, DataFormat.TEXT)),
        ("auto", "finetune", "bert", ["text"], False, False, (Task.MASKED_LM, DataFormat.TEXT)),
    ],
)
def test_resolve_task(requested, command, model_type, columns, prompt_set, label_set, expected):
    read = (lambda: columns) if columns is not None else None
    assert resolve_task(requested, command, model_type, read, prompt_set, label_set) == expected


def test_resolve_task_reads_columns_and_the_model_only_when_needed():
    def boom():
        raise AssertionError("columns read")

    assert resolve_task("classification", "finetune", "bert", boom) == (Task.CLASSIFICATION, DataFormat.LABELLED)
    assert resolve_task("auto", "pretrain", "gpt2", boom) == (Task.CAUSAL_LM, DataFormat.TEXT)
    # the model's LM objective is asked only for task: auto without labels
    assert resolve("classification", "finetune", boom, lambda: ["text", "label"]) == (Task.CLASSIFICATION, DataFormat.LABELLED)
    assert resolve("auto", "finetune", boom, lambda: ["text", "label"]) == (Task.CLASSIFICATION, DataFormat.LABELLED)


def test_unknown_model_type_and_wrong_command_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown model type 'gpt3'.*task: one of auto, causal-lm, masked-lm, classification"):
        resolve_task("auto", "pretrain", "gpt3")
    with pytest.raises(ConfigError, match="'t5' has no causal-LM or masked-LM head"):
        resolve_task("auto", "pretrain", "t5")
    with pytest.raises(ConfigError, match="task: classification is for `llmcli finetune`, not `llmcli pretrain`"):
        resolve_task("classification", "pretrain", "bert")


def test_task_of_a_saved_model_follows_its_architecture():
    from transformers import BertConfig, GPT2Config

    assert task_of_model(GPT2Config(architectures=["GPT2ForSequenceClassification"])) == Task.CLASSIFICATION
    assert task_of_model(BertConfig(architectures=["BertForMaskedLM"])) == Task.MASKED_LM
    assert task_of_model(GPT2Config(architectures=["GPT2LMHeadModel"])) == Task.CAUSAL_LM
    assert task_of_model(BertConfig()) == Task.MASKED_LM  # no architecture recorded: the type's objective


def test_unknown_model_type_exits_2_before_anything_is_written(cli, tmp_path):
    result = cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "task=auto",
                                   "model.model_type=gpt3", "model.config_overrides={}"), "-o", tmp_path / "r", expect=2)
    assert "unknown model type 'gpt3'" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# Sections a command reads


def test_a_set_section_the_command_ignores_is_an_error(cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{model_type: gpt2}}\ndata: {{train_file: {FIXTURES / 'shakespeare_small.txt'}}}\npeft: {{r: 4}}\n")
    result = cli("pretrain", "--config", config, "-o", tmp_path / "r", "--dry-run", expect=2)
    assert "config section 'peft' is not read by `llmcli pretrain`" in result.stderr
    result = cli("generate", "--model", "gpt2", "--set", "training.max_steps=3", "--prompt", "x", expect=2)
    assert "`llmcli generate` does not read the 'training' section" in result.stderr


def test_training_configs_carry_generation_and_eval_sections(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("generation: {max_new_tokens: 12}\neval: {stride: 64}\ntraining: {max_steps: 3}\n")
    cfg = load_config(config, command="pretrain")
    assert cfg.generation.max_new_tokens == 12 and cfg.training.max_steps == 3


def test_inference_commands_warn_once_about_a_run_config(gpt2_run, cli):
    result = cli("generate", "--config", gpt2_run / "config.yaml", "--model", gpt2_run, "--prompt", "ROMEO:",
                 "--max-new-tokens", "2", "--temperature", "0")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: `llmcli generate` reads only model, generation from the config; ignoring task, data, training"]


def test_a_reshaped_config_is_still_a_valid_config_for_its_run(gpt2_run):
    cfg = load_config(gpt2_run / "config.yaml", command="pretrain")
    assert cfg.task == Task.CAUSAL_LM and cfg.training.seed == 0


def test_a_callback_module_next_to_the_config_is_found(cli, tmp_path, monkeypatch):
    """`training.callbacks` and `reward.function` find a module in the current directory by one rule."""
    (tmp_path / "mycallbacks.py").write_text(
        "from transformers import TrainerCallback\n\nclass Stamp(TrainerCallback):\n"
        "    def on_train_end(self, args, state, control, **kwargs):\n"
        "        open(args.output_dir + '/stamped', 'w').write(str(state.global_step))\n")
    monkeypatch.chdir(tmp_path)
    cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "training.max_steps=2",
                          "training.callbacks=[mycallbacks:Stamp]"), "-o", tmp_path / "run")
    assert (tmp_path / "run" / "stamped").read_text() == "2"


@pytest.mark.parametrize("fmt, extra, expected", [
    (DataFormat.LABELLED, [], "group_by_length"),  # the default for classification
    (DataFormat.LABELLED, ["training.train_sampling_strategy=random"], "random"),
    (DataFormat.LABELLED, ["data.streaming=true", "training.max_steps=2"], None),  # a stream has no lengths
    (DataFormat.PROMPT_COMPLETION, [], None),  # random batches unless asked (see check_batching)
    (DataFormat.PROMPT_COMPLETION, ["training.train_sampling_strategy=group_by_length"], "group_by_length"),
    (DataFormat.PROMPT_COMPLETION, ["data.packing=true"], None),
    (DataFormat.TEXT, [], None),
])
def test_length_grouping_is_the_default_for_labelled_rows_only(fmt, extra, expected):
    from llmcli.tasks import check_batching

    cfg = load_config(None, extra, command="finetune")
    check_batching(cfg, fmt)
    assert (cfg.training.model_extra or {}).get("train_sampling_strategy") == expected
