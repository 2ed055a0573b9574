"""Learning from feedback: what `task: reward`, `task: dpo` and `task: rl` add to `llmcli finetune`.

    llmcli finetune --config configs/reward-reviews.yaml      # pairwise reward model (TRL RewardTrainer)
    llmcli finetune --config configs/dpo.yaml                 # DPO of a causal LM (TRL DPOTrainer)
    llmcli finetune --config configs/rl-positive-reviews.yaml # GRPO against a reward (TRL GRPOTrainer)

Each task trains with a TRL trainer through `training.fit`, so it gets every llmcli guarantee (run
dir, staged checkpoints, resume, signals, lock, NaN guard). This module supplies what differs:
- `check_config`: the `reward:` section and the `training:` defaults these trainers need
  (gradient checkpointing off; rl samples with the `generation:` settings);
- `datasets`: preference rows (prompt?, chosen, rejected) or prompts, checked row by row (exit 4,
  naming file and line) and renamed to TRL's columns; text or TRL's conversational form;
- `reward_function`: `reward:` -> a reward for GRPO: a classifier's probability of `label`, a
  reward model's score, or your `module:function` (texts -> floats). Texts are prompt + completion;
- `Setup`: per-task trainer arguments and what `summary.json` gains (rl: reward, KL to the
  reference and the reference's perplexity of samples before and after; reward: preference accuracy).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcli import console
from llmcli.config import Config, GenerationSection, ModelSection, TrainingSection
from llmcli.dist import is_main_process
from llmcli.errors import ConfigError, DataError
from llmcli.sources import RawData, _load_files, resolve_files
from llmcli.tasks import FEEDBACK_TASKS, Task

PROMPT_CANDIDATES = ("prompt", "query", "text")


# --------------------------------------------------------------------------------------------
# Config


def check_config(cfg: Config, task: Task) -> None:
    """Check `reward:` against the task and set the `training:` values these trainers need (before
    the run dir records the config, so config.yaml holds what actually ran)."""
    if task != Task.RL:
        if cfg.reward is not None:
            raise ConfigError(f"config section 'reward' is read only by task: rl (this run is task: {task}); remove it")
        if task not in FEEDBACK_TASKS:
            return
    else:
        _check_reward_section(cfg)
    explicit = set(cfg.training.model_extra or {})
    updates: dict[str, Any] = {}
    if "gradient_checkpointing" not in explicit:
        updates["gradient_checkpointing"] = False  # TRL's configs default it on: ~25% slower, only saves memory
    if task == Task.RL:
        if "disable_dropout" not in explicit:
            updates["disable_dropout"] = True  # as DPO's default: sampling, policy and reference log-probs agree
        updates.update(_sampling_arguments(cfg, explicit))
    if updates:
        cfg.training = TrainingSection.model_validate({**cfg.training.model_dump(), **updates})


def _check_reward_section(cfg: Config) -> None:
    r = cfg.reward
    if r is None or (r.model is None) == (r.function is None):
        raise ConfigError("task: rl needs a reward: set reward.model (a classifier run dir with reward.label, or a "
                          "reward-model run dir) or reward.function (module:function)")
    if r.function is not None and r.label is not None:
        raise ConfigError("reward.label goes with reward.model (a classifier), not reward.function")
    if r.function is not None:
        FunctionReward(r.function)  # importable and callable, before the run dir is touched
    else:
        _check_reward_model(r.model, r.label, cfg.model)


def _check_reward_model(path: str, label: str | None, m: ModelSection) -> None:
    """reward.model is a classifier with `label`, or a reward model without one (its config only)."""
    from llmcli import modeling, tasks

    config = modeling.load_pretrained_config(modeling.resolve_model_path(path), m)
    kind = tasks.task_of_model(config)
    if kind != Task.CLASSIFICATION:
        raise ConfigError(f"reward.model: {path} is a {kind} model; it must be a classifier or a reward model")
    labels = [str(v) for _, v in sorted((int(k), v) for k, v in config.id2label.items())]
    if tasks.is_reward_model(config):
        if label is not None:
            raise ConfigError(f"reward.label: {path} is a reward model (one score per text); remove reward.label")
    elif label is None:
        raise ConfigError(f"reward.label: {path} is a classifier; name the label whose probability is the reward (one of {', '.join(labels)})")
    elif label not in labels:
        raise ConfigError(f"reward.label: '{label}' is not a label of {path} (labels: {', '.join(labels)})")


# `generation:` key -> GRPOConfig field; GRPO samples with these, so they are set in one place only
SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "repetition_penalty": "repetition_penalty"}


def _sampling_arguments(cfg: Config, explicit: set[str]) -> dict[str, Any]:
    g = cfg.generation
    for key, gen_key in SAMPLING.items():
        if key in explicit:
            raise ConfigError(f"training.{key}: task rl samples with generation.{gen_key}; set it there")
    if "generation_kwargs" in explicit:
        raise ConfigError("training.generation_kwargs: task rl takes its sampling settings from the generation: section")
    if g.temperature == 0 or g.do_sample is False:
        raise ConfigError("task rl samples its completions: generation.temperature must be > 0 and do_sample not false")
    if g.stop:
        raise ConfigError("generation.stop: not supported by task rl (completions end at EOS or max_new_tokens)")
    if "num_return_sequences" in g.model_fields_set and g.num_return_sequences != 1:
        raise ConfigError("generation.num_return_sequences: task rl samples training.num_generations completions per prompt; set that instead")
    out: dict[str, Any] = {"temperature": g.temperature, "top_k": g.top_k or 0, "top_p": g.top_p or 1.0,
                           "repetition_penalty": g.repetition_penalty or 1.0}
    if "max_completion_length" in explicit:
        wanted = cfg.training.model_extra["max_completion_length"]
        if "max_new_tokens" in g.model_fields_set and wanted != g.max_new_tokens:
            raise ConfigError(f"training.max_completion_length={wanted} and generation.max_new_tokens={g.max_new_tokens} "
                              "disagree; set one of them")
        if wanted is not None and wanted < g.min_new_tokens:
            raise ConfigError(f"generation.min_new_tokens={g.min_new_tokens} exceeds training.max_completion_length={wanted}")
    else:
        out["max_completion_length"] = g.max_new_tokens
    if g.min_new_tokens > g.max_new_tokens:
        raise ConfigError(f"generation.min_new_tokens={g.min_new_tokens} exceeds generation.max_new_tokens={g.max_new_tokens}")
    if g.min_new_tokens:
        out["generation_kwargs"] = {"min_new_tokens": g.min_new_tokens}
    return out


# --------------------------------------------------------------------------------------------
# Data: rows checked, then renamed to TRL's columns


def datasets(task: Task, raw: RawData):
    """(DatasetDict with TRL's columns, one line for the log). Every row is checked first."""
    from datasets import DatasetDict

    data = raw.data
    preference = task in (Task.REWARD, Task.DPO)
    _check_sources(raw, preference)
    out = DatasetDict()
    for split, ds in raw.splits.items():
        names = preference_columns(ds, data) if preference else {"prompt": prompt_column(ds, data)}
        ds = ds.select_columns(list(names.values()))
        ds = ds.rename_columns({old: new for new, old in names.items() if old != new})
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        out[split] = ds.select(range(min(limit, len(ds)))) if limit else ds
    if "train" not in out:
        raise DataError("no training rows: set data.train_file (or a hub dataset with a train split)")
    kind = "conversations" if is_conversation(out["train"][0]["chosen" if preference else "prompt"]) else "text"
    held = f", {len(out['validation']):,} held out" if "validation" in out else ""
    what = "preference pairs" if preference else "prompts"
    return out, f"{task}: {len(out['train']):,} {what} ({kind}){held}"


def preference_columns(ds, data) -> dict[str, str]:
    """TRL column -> the data's column: prompt (optional), chosen, rejected."""
    columns = ds.column_names
    names = {}
    for role, key in (("chosen", "chosen_column"), ("rejected", "rejected_column"), ("prompt", "prompt_column")):
        name = getattr(data, key) or role
        if name not in columns:
            if role == "prompt" and not getattr(data, key):
                continue  # no prompt column: TRL takes the shared start of chosen/rejected (conversations) or none
            raise DataError(f"data.{key}: column '{name}' not found; the data has columns: {', '.join(columns)}")
        names[role] = name
    return names


def prompt_column(ds, data) -> str:
    columns = ds.column_names
    if data.prompt_column:
        if data.prompt_column not in columns:
            raise DataError(f"data.prompt_column: column '{data.prompt_column}' not found; the data has columns: {', '.join(columns)}")
        return data.prompt_column
    for name in PROMPT_CANDIDATES:
        if name in columns:
            return name
    raise DataError(f"data.prompt_column is not set and there is no 'prompt' column; the data has columns: {', '.join(columns)}")


def is_conversation(value) -> bool:
    """TRL's conversational form: a list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_sources(raw: RawData, preference: bool) -> None:
    """Check every row where it comes from: local files line by line (JSONL read directly, so the
    line is exact even where `datasets` could not load the file), hub splits row by row."""
    data = raw.data
    if data.train_file or data.validation_file:
        for key in ("train_file", "validation_file"):
            spec = getattr(data, key)
            for path in resolve_files(spec, key) if spec else []:
                _check_rows(_file_rows(path, data, key), data, preference, key)
    else:
        for split, ds in raw.splits.items():
            _check_rows(((f"the {split} split, row {i + 1}", row) for i, row in enumerate(ds)), data, preference, "dataset_name")


def _file_rows(path: str, data, key: str):
    """(where, row) for each row of a file: JSONL read line by line, other formats through `datasets`."""
    if Path(path).suffix.lower() == ".jsonl":
        return _jsonl_rows(path)
    ds = _load_files([path], data, key)
    if Path(path).suffix.lower() in (".csv", ".tsv"):
        return ((f"{path}:{i + 2}", row) for i, row in enumerate(ds))  # line 1 is the header
    return ((f"{path}: row {i + 1}", row) for i, row in enumerate(ds))


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                yield f"{path}:{i}", json.loads(line)  # sources.check_file has vetted the JSON


def _check_rows(rows, data, preference: bool, key: str) -> None:
    kind_seen: tuple[str, str] | None = None  # (kind, where) of the first row
    for where, row in rows:
        if preference:
            roles = [("chosen", data.chosen_column or "chosen"), ("rejected", data.rejected_column or "rejected")]
            prompt_key = data.prompt_column or "prompt"
            if data.prompt_column or prompt_key in row:
                roles.append(("prompt", prompt_key))
        else:
            name = data.prompt_column or next((c for c in PROMPT_CANDIDATES if c in row), None)
            if name is None:
                raise DataError(f"{where}: no 'prompt' field (fields: {', '.join(row) or 'none'}); set data.prompt_column")
            roles = [("prompt", name)]
        kinds = {}
        for role, column in roles:
            if column not in row:
                raise DataError(f"{where}: no '{column}' field (data.{role}_column); the row has: {', '.join(row) or 'nothing'}")
            value = row[column]
            if value is None:
                raise DataError(f"{where}: '{column}' is null")
            if isinstance(value, str):
                kinds[role] = "text"
                empty = not value.strip()
            elif is_conversation(value):
                kinds[role] = "conversation"
                empty = not value or any(not isinstance(m["content"], (str, list)) for m in value)
            else:
                raise DataError(f"{where}: '{column}' must be text or a list of {{role, content}} messages, got {type(value).__name__}")
            if empty and not (role == "prompt" and preference):
                raise DataError(f"{where}: '{column}' is empty")
        if len(set(kinds.values())) > 1:
            shown = ", ".join(f"'{c}' is {kinds[r]}" for r, c in roles)
            raise DataError(f"{where}: mixed row types ({shown}); use text for all fields or conversations for all")
        kind = next(iter(kinds.values()))
        if kind_seen is None:
            kind_seen = (kind, where)
        elif kind != kind_seen[0]:
            raise DataError(f"{where}: a {kind} row, but {kind_seen[1]} is a {kind_seen[0]} row; use one form for the whole data")


# --------------------------------------------------------------------------------------------
# Rewards


class Reward:
    """A reward for GRPO: `reward(prompts=, completions=, **columns)` -> one float per completion;
    `score(texts)` scores whole texts (prompt + completion)."""

    __name__ = "reward"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.score([join_text(p, c) for p, c in zip(prompts, completions)])

    def score(self, texts: list[str]) -> list[float]:
        raise NotImplementedError


def join_text(prompt, completion) -> str:
    """prompt + completion as one text; conversations as their messages' contents, one per line."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    messages = (prompt if isinstance(prompt, list) else [{"content": prompt}]) + (
        completion if isinstance(completion, list) else [{"content": completion}])
    return "\n".join(str(m.get("content", "")) for m in messages)


def reward_function(cfg: Config, device: str | None = None) -> Reward:
    from llmcli.dist import distributed_state, is_distributed

    r = cfg.reward
    if r.function is not None:
        return FunctionReward(r.function)
    if device is None and is_distributed():
        device = str(distributed_state().device)  # each rank scores its own completions on its own device
    return ModelReward(r.model, r.label, r.batch_size, cfg.model, device)


class FunctionReward(Reward):
    """`module:function`: a list of texts in, one float per text out."""

    def __init__(self, ref: str):
        from llmcli.tasks import load_object

        if ":" not in ref:
            raise ConfigError(f"reward.function: '{ref}' should be 'module:function'")
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)  # a module next to the config, as `python -m llmcli` would find it
        try:
            self.fn = load_object(ref)
        except ConfigError as err:
            raise ConfigError(f"reward.function: {err}") from None
        finally:
            if added:
                sys.path.remove(cwd)
        if not callable(self.fn):
            raise ConfigError(f"reward.function: '{ref}' is not callable")
        self.ref = ref
        self.__name__ = ref.rpartition(":")[2]

    def score(self, texts: list[str]) -> list[float]:
        out = self.fn(list(texts))
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ConfigError(f"reward.function: '{self.ref}' must return a list of numbers, got {type(out).__name__}") from None
        if len(values) != len(texts):
            raise ConfigError(f"reward.function: '{self.ref}' returned {len(values)} values for {len(texts)} texts")
        return values


class ModelReward(Reward):
    """A classifier's probability of `label`, or a reward model's score (its one logit), for each text."""

    def __init__(self, path: str, label: str | None, batch_size: int, m: ModelSection, device: str | None = None):
        from llmcli import modeling
        from llmcli.tasks import is_reward_model

        resolved = modeling.resolve_model_path(path)
        inference = ModelSection(trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
        _check_reward_model(path, label, m)
        self.model, self.tokenizer, _ = modeling.load_for_inference(resolved, inference, device, "float32")
        self.is_reward_model = is_reward_model(self.model.config)
        if self.is_reward_model:
            self.index, self.__name__ = 0, "reward_model"
        else:
            self.index = {v: int(k) for k, v in self.model.config.id2label.items()}[label]
            self.__name__ = f"p_{label}"
        self.batch_size = batch_size
        self.context = modeling.context_length(self.model.config) or 512

    def score(self, texts: list[str], add_eos: bool = True) -> list[float]:
        import torch

        if self.is_reward_model and add_eos and self.tokenizer.eos_token:
            texts = [t + self.tokenizer.eos_token for t in texts]  # as TRL's RewardTrainer trained it
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0.0] * len(texts)
        self.tokenizer.padding_side = "right"  # absolute positions start at 0
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.context,
                                     return_tensors="pt").to(self.model.device)
                with torch.inference_mode():
                    logits = self.model(**enc).logits.float()
                values = logits[:, 0] if self.is_reward_model else torch.softmax(logits, dim=-1)[:, self.index]
                for i, v in zip(idx, values.tolist()):
                    out[i] = v
        finally:
            self.model.train(was_training)
        return out


class RewardScorer(ModelReward):
    """A reward model already in memory (the one just trained, or `llmcli eval`'s) as a scorer."""

    def __init__(self, model, tokenizer, batch_size: int):
        from llmcli import modeling

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.is_reward_model, self.index = True, 0
        self.context = modeling.context_length(model.config) or 512


def preference_accuracy(scorer: ModelReward, rows) -> dict[str, Any]:
    """Share of pairs whose chosen response scores above the rejected one (ties count as wrong, as
    in TRL's accuracy), and the mean margin score(chosen) - score(rejected). Texts are built as
    TRL's RewardTrainer builds them: prompt + response + EOS, or the chat template of the messages."""
    prompts = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
    conversational = is_conversation(rows[0]["chosen"])

    def texts(responses):
        if conversational:
            return [scorer.tokenizer.apply_chat_template((p or []) + r, tokenize=False) for p, r in zip(prompts, responses)]
        return [(p or "") + r for p, r in zip(prompts, responses)]

    chosen = scorer.score(texts(rows["chosen"]), add_eos=not conversational)
    rejected = scorer.score(texts(rows["rejected"]), add_eos=not conversational)
    n = len(chosen)
    return {"preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "preference_margin": sum(c - r for c, r in zip(chosen, rejected)) / n, "preference_pairs": n}


def eval_pairs(data, split: str):
    """`llmcli eval` of a reward model: the preference rows it scores (the file `--data` names, else
    the hub split), checked like training rows and renamed to prompt/chosen/rejected."""
    from llmcli.data import load_eval_split

    raw = load_eval_split(data, split)
    key = "validation_file" if data.validation_file else "train_file" if data.train_file else None
    if key is not None:
        for path in resolve_files(getattr(data, key), key):
            _check_rows(_file_rows(path, data, key), data, True, key)
    else:
        _check_rows(((f"the {split} split, row {i + 1}", row) for i, row in enumerate(raw)), data, True, "dataset_name")
    names = preference_columns(raw, data)
    return raw.select_columns(list(names.values())).rename_columns({old: new for new, old in names.items() if old != new})


# --------------------------------------------------------------------------------------------
# Per-task trainer setup


@dataclass
class Setup:
    """What `fit` needs beyond the model: the datasets it trains/evaluates on, the trainer's extra
    arguments, and `after_train` entries for summary.json."""

    datasets: Any
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    after_train: Callable[[Any], dict[str, Any]] | None = None


def setup(task: Task, cfg: Config, model, tokenizer, rows, model_path: str, run_path: Path) -> Setup:
    if task == Task.REWARD:
        return _setup_reward(cfg, model, tokenizer, rows)
    if task == Task.DPO:
        return Setup(rows)
    return _setup_rl(cfg, model, tokenizer, rows, model_path, run_path)


def check_rows_for(rows, tokenizer) -> None:
    """Conversational rows need a chat template to become tokens (checked before the run dir)."""
    first = rows["train"][0]
    if any(is_conversation(v) for v in first.values()) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the rows are conversations (lists of messages) but the tokenizer has no chat template; "
                        "use text rows or a model whose tokenizer has one")


def _setup_reward(cfg: Config, model, tokenizer, rows) -> Setup:
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token  # BERT-style: TRL ends each response with the EOS token
    if tokenizer.pad_token is None:
        raise ConfigError("task: reward needs a tokenizer with a pad (or EOS) token")
    model.config.pad_token_id = tokenizer.pad_token_id

    def after_train(trainer) -> dict[str, Any]:
        if "validation" not in rows:
            return {}
        scorer = RewardScorer(trainer.accelerator.unwrap_model(trainer.model), tokenizer, trainer.args.per_device_eval_batch_size)
        return preference_accuracy(scorer, rows["validation"])

    return Setup(rows, after_train=after_train)


def _setup_rl(cfg: Config, model, tokenizer, rows, model_path: str, run_path: Path) -> Setup:
    from datasets import DatasetDict

    reward = reward_function(cfg)
    eval_prompts = list(rows["validation"]["prompt"]) if "validation" in rows else []
    strategy = str(cfg.training.model_extra.get("eval_strategy", "no"))
    periodic_eval = strategy not in ("no", "IntervalStrategy.NO")
    # GRPO evaluates by sampling num_generations per prompt; without periodic evaluation the eval
    # prompts serve only summary.json's before/after numbers (one pass each, below)
    fit_rows = rows if periodic_eval else DatasetDict(train=rows["train"])
    s = Setup(fit_rows, trainer_kwargs={"reward_funcs": [reward]})
    if not eval_prompts:
        console.warn("task rl: no eval prompts (data.validation_file or validation_split_percentage > 0): "
                      "summary.json gets no reward_before / reward_after")
        return s
    r = cfg.reward
    before = policy_eval(model, tokenizer, eval_prompts, reward, cfg.generation, r.eval_samples, cfg.training.seed,
                         ref_model=None, out_path=run_path / "samples_before.jsonl")
    s.summary = {f"{k}_before": v for k, v in before.items()}
    console.info(f"reward on {len(eval_prompts)} eval prompts before training: {before['reward']:.4f}")

    def after_train(trainer) -> dict[str, Any]:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        after = policy_eval(policy, tokenizer, eval_prompts, reward, cfg.generation, r.eval_samples, cfg.training.seed,
                            ref_model=_reference(policy, model_path), out_path=run_path / "samples_after.jsonl")
        console.info(f"reward on {len(eval_prompts)} eval prompts: {before['reward']:.4f} before, {after['reward']:.4f} after")
        return {**s.summary, **{f"{k}_after": v for k, v in after.items()}}

    s.after_train = after_train
    return s


def _reference(policy, model_path: str):
    """The starting model, for the KL and the perplexity of samples after training: the LoRA base
    (adapters disabled), or the start loaded again."""
    if hasattr(policy, "disable_adapter"):
        return _AdapterOff(policy)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=policy.dtype).to(policy.device).eval()


class _AdapterOff:
    def __init__(self, peft_model):
        self.peft_model = peft_model

    def __call__(self, **kw):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kw)


def policy_eval(model, tokenizer, prompts: list, reward: Reward, g: GenerationSection, samples: int, seed: int,
                ref_model=None, out_path: Path | None = None) -> dict[str, float]:
    """Sample `samples` completions per prompt with the run's sampling settings (seeded, the global
    RNG untouched), score prompt + completion with the reward; with `ref_model`, also GRPO's
    per-token KL estimate (k3) of policy vs reference on those samples and the reference's
    perplexity of the completions. The policy itself is the reference when `ref_model` is None."""
    import torch

    from llmcli.generate import _finish, _generate_kwargs, _pad

    was_training = model.training
    model.eval()
    texts, rows, kl_sum, nll_sum, n_tokens = [], [], 0.0, 0.0, 0
    eos = {t for t in _as_list(getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id)}
    cut = g.model_copy(update={"stop": []})
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            batch = max(1, g.batch_size // samples)
            for b in range(0, len(prompts), batch):
                chunk = prompts[b : b + batch]
                ids = [_prompt_ids(tokenizer, p) for p in chunk]
                input_ids, mask = _pad(tokenizer, ids, model.device, left=True)
                kwargs = _generate_kwargs(tokenizer, g, num_return_sequences=samples)
                kwargs["min_new_tokens"] = g.min_new_tokens
                out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
                new = out[:, input_ids.shape[1] :]
                for j, seq in enumerate(new.tolist()):
                    prompt = chunk[j // samples]
                    text, count, _ = _finish(tokenizer, seq, eos, cut)
                    rows.append({"prompt": prompt, "completion": text, "completion_tokens": count})
                    texts.append(join_text(prompt, text))
                stats = _token_stats(model, ref_model, out, input_ids.shape[1], mask.repeat_interleave(samples, 0),
                                     eos, g.temperature or 1.0)
                kl_sum += stats[0]
                nll_sum += stats[1]
                n_tokens += stats[2]
    finally:
        model.train(was_training)
    scores = reward.score(texts)
    for row, s in zip(rows, scores):
        row["reward"] = s
    if out_path is not None and is_main_process():
        out_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = {
        "reward": sum(scores) / len(scores),
        "completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
        "kl": kl_sum / n_tokens if n_tokens else 0.0,
        "ref_perplexity": math.exp(nll_sum / n_tokens) if n_tokens else None,
    }
    return result


def _prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt's token ids as GRPO builds them: the text, or the chat template for a conversation."""
    if is_conversation(prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]


def _token_stats(model, ref_model, out, prompt_len: int, prompt_mask, eos: set[int], temperature: float):
    """(sum of per-token k3 KL, sum of reference NLL, completion tokens) over the sampled completions,
    up to and including the first EOS (as GRPO masks them)."""
    import torch

    completion = out[:, prompt_len:]
    is_eos = torch.zeros_like(completion, dtype=torch.bool)
    for t in eos:
        is_eos |= completion == t
    # tokens after the first EOS are padding
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    comp_mask = ~after_eos
    attention = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)

    def logps(m, temp):
        logits = m(input_ids=out, attention_mask=attention, position_ids=position_ids).logits[:, prompt_len - 1 : -1].float()
        return torch.log_softmax(logits / temp, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    ref = ref_model if ref_model is not None else model
    ref_lp = logps(ref, 1.0)
    nll = -(ref_lp * comp_mask).sum().item()
    if ref_model is None:
        kl = 0.0
    else:
        diff = logps(ref_model, temperature) - logps(model, temperature)
        kl = ((torch.exp(diff) - diff - 1) * comp_mask).sum().item()
    return kl, nll, int(comp_mask.sum().item())


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
