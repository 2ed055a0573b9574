"""The one config schema, its loader and `--set` overrides.

A run is one YAML file validated against `Config`, plus `--set dotted.key=value` overrides parsed
as YAML scalars. Defaults live here only; files in `configs/` are deltas. Unknown keys are errors
at every depth (with a "did you mean" hint), and `training:` keys are checked against
`transformers.TrainingArguments` itself, so a typo never silently falls back to a default.

Relative paths in a config (data files, output_dir) are relative to the current directory, as in
the Transformers example scripts.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmcli.errors import ConfigError
from llmcli.tasks import Task


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    model_name_or_path: str | None = Field(None, description="Hub id, local model dir or llmcli run dir; absent = from scratch.")
    model_type: str = Field("gpt2", description="AutoConfig model type used when training from scratch (gpt2, bert, llama, ...).")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="Architecture fields for from-scratch models (n_layer, n_embd, ...).")
    tokenizer_name: str | None = Field(None, description="Hub id or local dir of a tokenizer; absent = the model's, or one trained here.")
    vocab_size: int = Field(8000, gt=0, description="Vocabulary size of a tokenizer trained here (from scratch, no tokenizer_name).")
    pad_vocab_to_multiple_of: int = Field(64, ge=1, description="Round a from-scratch model's embedding rows up to this multiple (GPU-friendly shapes).")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ... (None = the library's default).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repo. Off unless you trust the repo.")
    allow_pickle: bool = Field(False, description="Allow loading pickle (.bin) weights when a checkpoint has no safetensors.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    runtime: Literal["auto", "torch", "onnx"] = Field("auto", description="Classifiers in generate/eval/serve: onnx = the model.onnx `llmcli export` wrote; auto = it when present and current, else torch.")


class DataSection(Section):
    dataset_name: str | None = Field(None, description="Hub dataset id (e.g. wikitext, glue).")
    dataset_config_name: str | None = Field(None, description="Hub dataset config (e.g. wikitext-103-raw-v1, sst2).")
    train_file: str | list[str] | None = Field(None, description="Path, glob or list: .txt, .jsonl/.json, .csv/.tsv, .parquet.")
    validation_file: str | list[str] | None = Field(None, description="Same forms as train_file; absent = hold out validation_split_percentage.")
    validation_split_percentage: float = Field(5, ge=0, lt=100, description="Percent of training data held out when there is no validation file/split.")
    train_split: str = Field("train", description="Split of a hub dataset to train on.")
    validation_split: str | None = Field(None, description="Split of a hub dataset to validate on (default: validation, else held out).")
    text_column: str | None = Field(None, description="Column holding the text (default: 'text', else 'sentence', else the only string column).")
    text_pair_column: str | None = Field(None, description="Second text column for pair classification.")
    label_column: str | None = Field(None, description="Label column for classification (default: 'label' if present).")
    prompt_column: str | None = Field(None, description="Instruction data: prompt column (loss only on the completion).")
    completion_column: str | None = Field(None, description="Instruction data: completion column.")
    chosen_column: str | None = Field(None, description="Preference data (task reward/dpo): the preferred response (default 'chosen').")
    rejected_column: str | None = Field(None, description="Preference data (task reward/dpo): the dispreferred response (default 'rejected').")
    block_size: int | None = Field(None, gt=0, description="Tokens per LM training example (default: min(1024, the model's context)).")
    max_seq_length: int = Field(128, gt=0, description="Truncation length for classification and prompt/completion examples.")
    packing: bool = Field(False, description="Prompt/completion fine-tuning: pack rows into max_seq_length blocks, each row attending only to itself (a batch is then blocks, not rows).")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked for masked-LM training and evaluation.")
    keep_linebreaks: bool = Field(True, description="Keep newlines when reading .txt files (as run_clm.py).")
    preprocessing_num_workers: int | None = Field(None, ge=1, description="Processes for tokenization (None = 1).")
    max_train_samples: int | None = Field(None, gt=0, description="Truncate the training set (after tokenization/grouping) for quick runs.")
    max_eval_samples: int | None = Field(None, gt=0, description="Truncate the evaluation set for quick runs.")
    streaming: bool = Field(False, description="Stream the training data instead of tokenizing it all up front (needs max_steps).")
    cache_dir: str | None = Field(None, description="Tokenized-data cache (default: $LLMCLI_CACHE or ~/.cache/llmcli).")

    @model_validator(mode="after")
    def _one_source(self):
        """Data comes from the hub or from files, never both (a file silently winning over a hub id hides a mistake)."""
        if self.dataset_name and (self.train_file or self.validation_file):
            raise ValueError("data.dataset_name and data.train_file/validation_file are both set; keep one source "
                             "(--set data.dataset_name=null to use the files)")
        return self


class TrainingSection(BaseModel):
    """`TrainingArguments` fields (checked against it) plus the few llmcli-only keys declared here."""

    model_config = ConfigDict(extra="allow")

    output_dir: str | None = Field(None, description="The run directory.")
    early_stopping_patience: int | None = Field(None, ge=1, description="llmcli: stop after this many evaluations without improvement.")
    early_stopping_threshold: float = Field(0.0, ge=0, description="llmcli: minimum improvement that resets the patience counter.")
    nan_check: bool = Field(True, description="llmcli: stop with exit 1 on a NaN/inf loss, keeping the last good checkpoint.")
    curves: bool = Field(True, description="llmcli: draw curves.png in the run dir at evaluations and at the end.")
    callbacks: list[str] = Field(default_factory=list, description="llmcli: your own TrainerCallback classes as 'module:Class' (built with no arguments).")
    seed: int = Field(42, description="Seed for model init, data order, held-out split and tokenizer training (TrainingArguments field).")
    include_num_input_tokens_seen: str | bool = Field("non_padding", description="Count tokens for tokens/s (TrainingArguments field).")

    LLMCLI_KEYS: ClassVar[frozenset] = frozenset({"early_stopping_patience", "early_stopping_threshold", "nan_check", "callbacks", "curves"})


class PeftSection(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str | None = Field(None, description="Module names to adapt (None = peft's default for the architecture).")
    merge: bool = Field(True, description="Also save a merged full model under merged/.")


class GenerationSection(Section):
    max_new_tokens: int = Field(64, gt=0, description="Tokens to generate per prompt.")
    min_new_tokens: int = Field(0, ge=0, description="Generate at least this many tokens before EOS may end a completion (task rl: the policy cannot win by stopping early).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 means greedy.")
    top_k: int | None = Field(50, ge=0, description="Sample from the k most likely tokens (0/None = off).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (None = off).")
    min_p: float | None = Field(None, gt=0, le=1, description="Keep tokens at least this fraction as likely as the most likely one (None = off).")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalty > 1 discourages repeats.")
    num_return_sequences: int = Field(1, ge=1, description="Completions per prompt.")
    do_sample: bool | None = Field(None, description="None = sample when temperature > 0.")
    stop: list[str] = Field(default_factory=list, description="Cut a completion at the first of these strings.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    batch_size: int = Field(64, ge=1, description="Prompts per batch.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("generation.stop: an empty stop string would cut every completion before its first token")
        return value


class ServeSection(Section):
    host: str = Field("127.0.0.1", description="Address to bind (0.0.0.0 exposes the server: set an API key).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port, printed at startup).")
    api_key: str | None = Field(None, description="Every request needs `Authorization: Bearer KEY` (prefer the LLMCLI_API_KEY environment variable to a file).")
    model_name: str | None = Field(None, description="The model id clients send (default: the run dir's or hub id's last path part).")
    max_batch_size: int = Field(64, ge=1, description="Most rows (prompts x n) in the running batch.")
    max_wait_ms: float = Field(10.0, ge=0, description="With nothing running, how long the first request waits for others to start with it (later ones join the running batch at its next step).")
    max_tokens: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_request_bytes: int = Field(1 << 20, ge=1, description="Largest request body (413 above).")
    shutdown_timeout: float = Field(30.0, ge=0, description="On SIGTERM/SIGINT: seconds to let requests in flight finish.")
    chat_template: str | None = Field(None, description="A Jinja chat template (or a file holding one) for a model without its own.")


class EvalSection(Section):
    split: str = Field("test", description="Hub dataset split to evaluate.")
    max_length: int | None = Field(None, gt=1, description="Sliding-window length in tokens (default: the model's context).")
    stride: int | None = Field(None, gt=0, description="Tokens scored per window (default: max_length).")
    per_document: bool = Field(False, description="Score each document separately (lm-eval style) and aggregate.")
    add_bos: bool = Field(False, description="Prepend the BOS token to the evaluation text.")
    batch_size: int = Field(8, ge=1, description="Windows or examples per forward pass.")
    fail_under: dict[str, float] = Field(default_factory=dict, description="Exit 3 when a metric is below this value.")
    fail_over: dict[str, float] = Field(default_factory=dict, description="Exit 3 when a metric is above this value.")


class RewardSection(Section):
    """`task: rl`: what scores the policy's texts (prompt + completion): one of model / function (a list: a weighted sum)."""

    model: str | None = Field(None, description="A classifier (with `label`) or reward-model run dir / model dir that scores the texts.")
    label: str | None = Field(None, description="Classifier label whose probability is the reward (e.g. positive); not for reward models.")
    function: str | None = Field(None, description="'module:function' taking a list of texts (and, by parameter name, prompts, completions or any other column of the rows) and returning one float per text.")
    weight: float = Field(1.0, description="This reward's weight in the sum GRPO maximises (TRL's reward_weights).")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass of the reward model.")
    eval_samples: int = Field(1, ge=1, description="Completions per eval prompt for summary.json's reward_before / reward_after.")


class LaunchSection(Section):
    num_processes: int = Field(1, ge=1, description="Processes to start through accelerate (one per GPU).")
    config_file: str | None = Field(None, description="An accelerate config file (configs/accelerate/*.yaml).")


# The sections each command reads (the rest of a shared config is ignored by that command).
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("task", "model", "data", "training", "launch"),
    "finetune": ("task", "model", "data", "training", "peft", "reward", "launch"),
    "generate": ("model", "generation"),
    "eval": ("model", "data", "eval", "launch"),
    "serve": ("model", "generation", "serve"),
    "export": ("model", "data"),
}


# Sections a training config may carry for later `generate`/`eval` runs of its model, unread by training.
CARRIED_SECTIONS = ("generation", "eval", "serve")

# Sections a command reads only for some tasks: `task: rl` samples with `generation:`.
TASK_SECTIONS: dict[tuple[str, str], tuple[str, ...]] = {("finetune", "rl"): ("generation",)}


def sections_read(command: str, task) -> tuple[str, ...]:
    return COMMAND_SECTIONS[command] + TASK_SECTIONS.get((command, str(task)), ())


class Config(Section):
    task: Literal["auto"] | Task = Field("auto", description="auto = causal-lm for decoders, masked-lm for BERT-style encoders; classification for finetune with labels. reward / dpo / rl: learning from feedback (finetune).")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    peft: PeftSection | None = None
    reward: RewardSection | list[RewardSection] | None = Field(None, description="task rl: one reward, or a list whose weighted sum is the reward.")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)

    @field_validator("peft", mode="before")
    @classmethod
    def _peft_true_means_defaults(cls, value):
        return {} if value is True else (None if value is False else value)

    def training_arguments(self) -> dict[str, Any]:
        """The `training:` keys that go to `TrainingArguments` (llmcli-only keys removed)."""
        raw = self.training.model_dump()
        return {k: v for k, v in raw.items() if k not in TrainingSection.LLMCLI_KEYS}


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), command: str | None = None,
                values: dict[str, Any] | None = None, check_training: bool = True) -> Config:
    """Read YAML (optional), apply `--set` overrides, then `values` (dotted key -> value, taken as is,
    not parsed as YAML: e.g. `--stop` strings), validate. Raises ConfigError (exit 2).

    With `command`, sections that command does not read are checked (`check_sections`). `training:`
    keys are checked against the task's arguments class (and YAML strings such as `5e-4` converted)
    unless the command does not read that section."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    file_sections = set(raw)
    set_sections = set()
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(raw, keys, value)
        set_sections.add(keys[0])
    for key, value in (values or {}).items():
        _set_dotted(raw, key.split("."), value)
        set_sections.add(key.split(".")[0])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    if command is not None:
        check_sections(cfg, command, file_sections, set_sections)
    if check_training and (command is None or "training" in COMMAND_SECTIONS[command]):  # init checks them its own way
        from llmcli import tasks

        cfg.training = TrainingSection.model_validate(tasks.check_training_keys(cfg.training.model_dump(), tasks.args_class(cfg.task)))
        for ref in cfg.training.callbacks:  # fail before the run dir is touched
            tasks.callback_class(ref)
    return cfg


def check_sections(cfg: Config, command: str, file_sections: set[str], set_sections: set[str]) -> None:
    """A section the command does not read is an error when set on its command line (`--set`) or,
    for training commands, in the config file (e.g. `peft:` in a pretrain config would be silently
    ignored); `generation:`/`eval:` may ride along in training configs for later commands.
    `generate`/`eval` often take a run's whole config.yaml: there, unread sections get one warning."""
    reads = sections_read(command, cfg.task)
    unread = [name for name in Config.model_fields if name not in reads and _is_set(cfg, name)]
    for name in unread:
        if name in set_sections:
            raise ConfigError(f"--set {name}.…: `llmcli {command}` does not read the '{name}' section (it reads {', '.join(reads)})")
    training = "training" in reads
    refused = [n for n in unread if n in file_sections and training and n not in CARRIED_SECTIONS]
    if refused:
        raise ConfigError(f"config section '{refused[0]}' is not read by `llmcli {command}` (it reads {', '.join(reads)}); remove it")
    ignored = [n for n in unread if n in file_sections and not training]
    if ignored:
        from llmcli import console

        console.warn(f"`llmcli {command}` reads only {', '.join(reads)} from the config; ignoring {', '.join(ignored)}")


def _is_set(cfg: Config, name: str) -> bool:
    field = Config.model_fields[name]
    return getattr(cfg, name) != field.get_default(call_default_factory=True)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, training:, ...)")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], yaml-parsed value). `--set data.dataset_name=null` gives None."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value (e.g. --set training.max_steps=20)")
    if text.strip().lower() in _YAML11_BOOLS:
        return key.split("."), text.strip()  # `=no` is the string "no" (eval_strategy=no), not YAML 1.1's False
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not a YAML scalar: keep the literal string; the schema decides if that fits
    return key.split("."), value


_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None or child is True:  # `peft: true` is the shorthand for a section of defaults
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def suggest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _format_validation_error(err: ValidationError) -> str:
    # of a union's members (reward: one section or a list), report the one that fits the input's kind
    first = next((e for e in err.errors() if not e["type"].endswith("_type")), err.errors()[0])
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    # pydantic appends union member names to loc (e.g. 'str', 'list[str]'): keep only the config path
    path: list[str] = []
    for part in loc:
        if part[:1].isupper() or "[" in part:  # a union member's tag (reward: RewardSection | list[...])
            continue
        owner = _section_model(path)
        if owner is None or (part not in owner.model_fields and first["type"] != "extra_forbidden"):
            break
        path.append(part)
    key = ".".join(path) or ".".join(loc)
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        owner = _section_model(path[:-1])
        hint = suggest(path[-1], owner.model_fields) if owner else ""
        where = f"in section '{'.'.join(path[:-1])}'" if len(path) > 1 else "at the top level"
        return f"unknown config key '{key}' {where}{hint}{more}"
    if first["type"] == "missing":
        return f"config key '{key}' is required{more}"
    if first["type"] == "value_error":  # a section's own rule: its message names the keys
        return first["msg"].removeprefix("Value error, ") + more
    return f"config key '{key}': {first['msg']}, got {first.get('input')!r}{more}"


def _section_model(path: list[str]):
    """The pydantic model of the section at `path` (Config for []), or None below a plain field."""
    model: Any = Config
    for part in path:
        ann = model.model_fields[part].annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def dump_resolved(cfg: Config, path: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write the resolved config atomically as YAML; provenance goes in leading comments so the
    file stays a valid `--config` for a later run."""
    from llmcli.files import atomic_write_text

    header = "".join(f"# {k}: {v}\n" for k, v in (provenance or {}).items())
    atomic_write_text(path, header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
