"""`llmcli init`: the generated YAML is a valid config for its command, with every key, its
description and default; `--from` keeps a config's values; shell completion."""

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from conftest import FIXTURES, ROOT

from llmcli import config
from llmcli.sweep import schema

COMMANDS = ("pretrain", "finetune", "generate", "eval")


def _sections_of(cfg, command):
    dump = cfg.model_dump(mode="json")
    return {s: dump[s] for s in config.COMMAND_SECTIONS[command]}


def _uncomment_block(text, first, last_prefix):
    """Uncomment the commented `peft:` block (lines starting '# ' after the `peft: null` line)."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        if line == first:
            inside = True
            out.append(line[2:])
            continue
        if inside and line.startswith(last_prefix):
            out.append(line[2:])
            continue
        inside = False
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_a_valid_config_with_every_key_described(cli, tmp_path, command):
    text = cli("init", command).stdout
    assert text.splitlines()[0] == f"# llmcli {command} --config {command}.yaml"
    path = tmp_path / "c.yaml"
    path.write_text(text)
    loaded = config.load_config(path, command=command) if command != "sweep" else config.Config()
    assert _sections_of(loaded, command) == _sections_of(config.Config(), command)
    raw = yaml.safe_load(text)
    assert set(raw) == set(config.COMMAND_SECTIONS[command])
    for section in config.COMMAND_SECTIONS[command]:
        model = config.Config.model_fields[section].annotation
        model = next((a for a in getattr(model, "__args__", (model,)) if isinstance(a, type) and hasattr(a, "model_fields")), None)
        if model is None:
            continue
        if raw[section] is None:  # peft / reward: off by default, their keys commented out below them
            assert config.Config.model_fields[section].default is None, section
            on = _uncomment_block(text, f"# {section}:", "#   ")
            keys = set(yaml.safe_load(on)[section])
            if section == "peft":  # uncommented, the defaults load (reward needs a model or function first)
                (tmp_path / "on.yaml").write_text(on)
                assert config.load_config(tmp_path / "on.yaml").peft == config.PeftSection()
        else:
            keys = set(raw[section])
        assert keys == set(model.model_fields), section  # every field, nothing else
        for name, field in model.model_fields.items():
            first_words = " ".join(field.description.split()[:4])
            assert first_words in " ".join(line.lstrip(" #") for line in text.splitlines()), (section, name)


def test_training_lists_common_arguments_with_transformers_defaults(cli, tmp_path):
    from transformers import TrainingArguments

    from llmcli.report.init import COMMON_TRAINING_ARGUMENTS

    text = cli("init", "pretrain").stdout
    commented = dict(re.findall(r"^  # (\w+): (.*)$", text, flags=re.M))
    ta = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    assert [k for k in commented if k in ta] == list(COMMON_TRAINING_ARGUMENTS)
    for name in COMMON_TRAINING_ARGUMENTS:
        default = ta[name].default
        default = getattr(default, "value", default)
        assert yaml.safe_load(commented[name]) == default, name
    # uncommented, they are all accepted TrainingArguments values
    on = re.sub(r"^  # (\w+: .*)$", lambda m: "  " + m.group(1) if m.group(1).split(":")[0] in ta else m.group(0), text, flags=re.M)
    (tmp_path / "on.yaml").write_text(on)
    loaded = config.load_config(tmp_path / "on.yaml")
    assert loaded.training.model_dump()["learning_rate"] == ta["learning_rate"].default
    assert len([k for k in loaded.training.model_extra if k in COMMON_TRAINING_ARGUMENTS]) == len(COMMON_TRAINING_ARGUMENTS)


@pytest.mark.parametrize("command, source", [
    ("pretrain", "configs/shakespeare.yaml"), ("finetune", "configs/sst2-minilm-cpu.yaml"),
    ("finetune", "configs/sst2.yaml"), ("eval", "configs/eval-wikitext.yaml"), ("generate", "configs/eval-wikitext.yaml"),
])
def test_from_keeps_the_values_of_a_config(cli, tmp_path, command, source):
    out = tmp_path / "gen.yaml"
    result = cli("init", command, "--from", ROOT / source, "--output", out)
    assert result.stdout == "" and out.exists()
    original = config.load_config(ROOT / source, command=command)
    assert _sections_of(config.load_config(out, command=command), command) == _sections_of(original, command)


def test_pretrain_dry_run_of_the_generated_config_matches_the_source(cli, tmp_path):
    out = tmp_path / "shakespeare.yaml"
    cli("init", "pretrain", "--from", ROOT / "configs/shakespeare.yaml", "-o", out)
    generated = cli("pretrain", "--config", out, "--dry-run", "-o", tmp_path / "run").stdout
    source = cli("pretrain", "--config", ROOT / "configs/shakespeare.yaml", "--dry-run", "-o", tmp_path / "run").stdout
    assert generated == source and "max_steps: 600" in generated


def test_finetune_template_runs_dry_once_the_data_is_named(cli, gpt2_run, tmp_path):
    out = tmp_path / "ft.yaml"
    cli("init", "finetune", "-o", out)
    result = cli("finetune", "--config", out, "--model", gpt2_run, "--set", f"data.train_file={FIXTURES / 'shakespeare_small.txt'}",
                 "-o", tmp_path / "run", "--dry-run")
    assert "causal-lm" in result.stderr and "would resume from" in result.stderr


def test_bad_uses_exit_2(cli, tmp_path):
    existing = tmp_path / "x.yaml"
    existing.write_text("keep me\n")
    err = cli("init", "pretrain", "-o", existing, expect=2).stderr
    assert err == f"error: --output {existing}: the file exists; delete it or pick another name\n"
    assert existing.read_text() == "keep me\n"
    err = cli("init", "pretrain", "--from", tmp_path / "missing.yaml", expect=2).stderr
    assert err == f"error: config file not found: {tmp_path / 'missing.yaml'}\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 1\n")
    assert "did you mean 'learning_rate'" in cli("init", "pretrain", "--from", bad, expect=2).stderr
    bad.write_text("training:\n  learning_rate: fast\n")  # types are checked too, from TrainingArguments' source
    assert cli("init", "pretrain", "--from", bad, expect=2).stderr == \
        "error: config key 'training.learning_rate': expected float, got 'fast'\n"
    bad.write_text("training:\n  save_strategy: no\n  learning_rate: 5e-4\n")  # YAML's `no` and a string number
    training = yaml.safe_load(cli("init", "pretrain", "--from", bad).stdout)["training"]
    assert training["save_strategy"] == "no" and training["learning_rate"] == 5e-4
    cli("init", "train", expect=2)


def test_init_sweep_needs_a_sweep_config(cli, tmp_path):
    out = tmp_path / "sweep.yaml"
    cli("init", "sweep", "-o", out)
    written = yaml.safe_load(out.read_text())
    assert set(written) == set(schema.SweepConfig.model_fields)
    # defaults are the schema's (not null), and search is a mapping of keys to spaces, not one space
    assert (written["metric"], written["direction"], written["sampler"], written["baseline"]) == ("eval_loss", "minimize", "tpe", True)
    assert written["search"] == {} and "training.learning_rate: {type: float" in out.read_text()


def test_init_sweep_validates_once_filled_and_from_keeps_every_key(cli, tmp_path):
    """The written file is a valid sweep once the keys without a default are given (base, command,
    search; n_trials for tpe), and --from a sweep file keeps every key, the searched ones included."""
    out = tmp_path / "sweep.yaml"
    cli("init", "sweep", "-o", out)
    filled = yaml.safe_load(out.read_text())
    filled.update(base=str(ROOT / "configs/shakespeare.yaml"), command="pretrain", n_trials=4,
                  search={"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                          "training.weight_decay": {"type": "categorical", "choices": [0.0, 0.1]}})
    (tmp_path / "filled.yaml").write_text(yaml.safe_dump(filled))
    source = schema.load_sweep_config(tmp_path / "filled.yaml")
    again = tmp_path / "again.yaml"
    cli("init", "sweep", "--from", tmp_path / "filled.yaml", "-o", again)
    assert schema.load_sweep_config(again) == source and set(source.search) == {"training.learning_rate", "training.weight_decay"}


def test_init_lists_every_task(cli):
    text = cli("init", "pretrain").stdout
    assert "One of: auto, causal-lm, masked-lm, classification, reward, dpo, rl." in " ".join(
        line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))


def test_shell_completion(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmcli.cli import app

    runner = CliRunner()
    # the shell named, not found among this process's parents (there is none when the suite runs as a background job)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="llmcli")
    assert script.exit_code == 0 and "complete -o default -F _llmcli_completion llmcli" in script.stdout, \
        (script.stdout[-300:], script.stderr[-300:], repr(script.exception))
    env = {"_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli rep", "COMP_CWORD": "1"}
    assert runner.invoke(app, [], prog_name="llmcli", env=env).stdout == "report\n"
    env = {"_LLMCLI_COMPLETE": "complete_bash", "COMP_WORDS": "llmcli init f", "COMP_CWORD": "2"}
    assert runner.invoke(app, [], prog_name="llmcli", env=env).stdout == "finetune\n"


def test_training_arguments_read_from_source_equal_the_imported_class():
    """`init` reads TrainingArguments' defaults and help from its source (no torch import); they are
    the imported dataclass's own for every common argument."""
    from llmcli.report.init import COMMON_TRAINING_ARGUMENTS, _imported_training_argument_fields, training_argument_fields

    read, imported = training_argument_fields(), _imported_training_argument_fields()
    assert set(read) == set(imported)
    for name in COMMON_TRAINING_ARGUMENTS:
        assert (read[name].default, read[name].help) == (imported[name].default, imported[name].help), name


@pytest.mark.parametrize("args", [["init", "finetune"], ["init", "finetune", "--from", str(ROOT / "configs/sst2.yaml")]])
def test_init_never_imports_torch(args):
    """Plain, and `--from` a training config: its training keys are checked against TrainingArguments' source."""
    code = ("import sys\nfrom llmcli.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
