"""Learning from feedback: what `task: reward`, `task: dpo` and `task: rl` add to `llmcli finetune`.

    llmcli finetune --config configs/reward-reviews.yaml      # pairwise reward model (TRL RewardTrainer)
    llmcli finetune --config configs/dpo.yaml                 # DPO of a causal LM (TRL DPOTrainer)
    llmcli finetune --config configs/rl-positive-reviews.yaml # GRPO against a reward (TRL GRPOTrainer)

Each task trains with a TRL trainer through `train/fit.py`, so it gets every llmcli guarantee (run
dir, staged checkpoints, resume, signals, lock, NaN guard). This module supplies what differs:
- `check_config`: the `reward:` section and the `training:` defaults these trainers need
  (gradient checkpointing off; rl samples with the `generation:` settings);
- `Setup`: per-task trainer arguments and what `summary.json` gains (rl: reward, KL to the
  reference and the reference's perplexity of samples before and after; reward: preference accuracy).
The rows come from `data/preferences.py`, the reward and the before/after measurement from `rewards.py`,
scoring a reward model from `evaluate/scoring.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcli import console
from llmcli.config import Config, TrainingSection
from llmcli.dist import distributed_state
from llmcli.errors import ConfigError
from llmcli.evaluate.scoring import Scorer, preference_accuracy
from llmcli.feedback.reference import AdapterOff, disable_dropout, grpo_with_reference, reference_of
from llmcli.feedback.rewards import FunctionReward, check_reward_model, policy_eval, reward_functions, sections
from llmcli.tasks import FEEDBACK_TASKS, Task

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
        if "reward_weights" in explicit:
            raise ConfigError("training.reward_weights: task rl takes the weights from the reward: list (reward[].weight)")
        updates["reward_weights"] = [r.weight for r in sections(cfg)]
        updates.update(_sampling_arguments(cfg, explicit))
        _check_exact_resume(cfg)
    if updates:
        cfg.training = TrainingSection.model_validate({**cfg.training.model_dump(), **updates})


def _check_reward_section(cfg: Config) -> None:
    rewards = sections(cfg)
    if not rewards:
        raise ConfigError("task: rl needs a reward: set reward.model (a classifier run dir with reward.label, or a "
                          "reward-model run dir) or reward.function (module:function), or a list of them with weights")
    for i, r in enumerate(rewards):
        key = "reward" if len(rewards) == 1 else f"reward[{i}]"
        if (r.model is None) == (r.function is None):
            raise ConfigError(f"{key}: set exactly one of model (a classifier or reward-model run dir) or function (module:function)")
        if r.function is not None and r.label is not None:
            raise ConfigError(f"{key}.label goes with {key}.model (a classifier), not {key}.function")
        if r.function is not None:
            FunctionReward(r.function)  # importable and callable, before the run dir is touched
        else:
            check_reward_model(r.model, r.label, cfg.model)
    if len({r.eval_samples for r in rewards}) > 1:
        raise ConfigError("reward[].eval_samples: the rewards disagree; give them one value (completions per eval prompt)")


def _check_exact_resume(cfg: Config) -> None:
    """GRPO samples a generation batch and trains on it for `steps_per_generation x num_iterations`
    micro-steps; the completions it holds in between are not in a checkpoint, so a run resumed from
    one taken mid-cycle would train on new samples. With one cycle per optimizer step (TRL's
    defaults) every checkpoint is at a cycle's end and a resume equals an uninterrupted run."""
    t = cfg.training.model_extra or {}
    accumulation = t.get("gradient_accumulation_steps") or 1
    spg = t.get("steps_per_generation")
    if spg is None and t.get("generation_batch_size"):
        spg = t["generation_batch_size"] // ((t.get("per_device_train_batch_size") or 8) * cfg.launch.num_processes)
    cycle = (spg or accumulation) * (t.get("num_iterations") or 1)
    if cycle != accumulation:
        raise ConfigError(f"task rl: training.num_iterations / steps_per_generation / generation_batch_size reuse one batch of "
                          f"completions for {cycle} micro-steps, not one optimizer step ({accumulation}); a checkpoint in "
                          "between cannot resume exactly, so llmcli takes num_iterations: 1 and one generation per "
                          "optimizer step (more completions per step: raise per_device_train_batch_size or "
                          "gradient_accumulation_steps)")


# `generation:` key -> GRPOConfig field; GRPO samples with these, so they are set in one place only
SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}


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
    out: dict[str, Any] = {"temperature": g.temperature, "top_k": g.top_k or 0, "top_p": g.top_p or 1.0, "min_p": g.min_p,
                           "repetition_penalty": g.repetition_penalty or 1.0}
    if "max_completion_length" in explicit:
        wanted = cfg.training.model_extra["max_completion_length"]
        if "max_new_tokens" in g.model_fields_set and wanted != g.max_new_tokens:
            raise ConfigError(f"training.max_completion_length={wanted} and generation.max_new_tokens={g.max_new_tokens} "
                              "disagree; set one of them")
        if wanted is None or wanted < 1:
            raise ConfigError("training.max_completion_length: task rl needs a positive length (or set generation.max_new_tokens)")
        if wanted < g.min_new_tokens:
            raise ConfigError(f"generation.min_new_tokens={g.min_new_tokens} exceeds training.max_completion_length={wanted}")
        # the before/after samples (rewards.policy_eval) read generation:, so it holds what GRPO samples with
        cfg.generation = g = g.model_copy(update={"max_new_tokens": wanted})
    else:
        out["max_completion_length"] = g.max_new_tokens
    if g.min_new_tokens > g.max_new_tokens:
        raise ConfigError(f"generation.min_new_tokens={g.min_new_tokens} exceeds generation.max_new_tokens={g.max_new_tokens}")
    if g.min_new_tokens:
        out["generation_kwargs"] = {"min_new_tokens": g.min_new_tokens}
    return out


# --------------------------------------------------------------------------------------------
# Per-task trainer setup


@dataclass
class Setup:
    """What `fit` needs beyond the model: the datasets it trains/evaluates on, the trainer class
    (None: the task table's) and its extra arguments, and `after_train` entries for summary.json."""

    datasets: Any
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    after_train: Callable[[Any], dict[str, Any]] | None = None
    trainer_cls: type | None = None


def setup(task: Task, cfg: Config, model, tokenizer, rows, run_path: Path) -> Setup:
    if task == Task.REWARD:
        return _setup_reward(cfg, model, tokenizer, rows)
    if cfg.training.model_extra.get("disable_dropout", True):  # DPOConfig's default; rl's is set in check_config
        disable_dropout(model)
    if task == Task.DPO:
        reference = reference_of(model)
        return Setup(rows, trainer_kwargs={"ref_model": reference} if reference is not None else {})
    return _setup_rl(cfg, model, tokenizer, rows, run_path)


def _setup_reward(cfg: Config, model, tokenizer, rows) -> Setup:
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token  # BERT-style: TRL ends each response with the EOS token
    if tokenizer.pad_token is None:
        raise ConfigError("task: reward needs a tokenizer with a pad (or EOS) token")
    model.config.pad_token_id = tokenizer.pad_token_id

    def after_train(trainer) -> dict[str, Any]:
        if "validation" not in rows:
            return {}
        scorer = Scorer(trainer.accelerator.unwrap_model(trainer.model), tokenizer, trainer.args.per_device_eval_batch_size)
        return preference_accuracy(scorer, rows["validation"])

    return Setup(rows, after_train=after_train)


def _setup_rl(cfg: Config, model, tokenizer, rows, run_path: Path) -> Setup:
    from datasets import DatasetDict

    rewards = reward_functions(cfg)
    eval_rows = [dict(r) for r in rows["validation"]] if "validation" in rows else []
    strategy = str(cfg.training.model_extra.get("eval_strategy", "no"))
    periodic_eval = strategy not in ("no", "IntervalStrategy.NO")
    # GRPO evaluates by sampling num_generations per prompt; without periodic evaluation the eval
    # prompts serve only summary.json's before/after numbers (one pass each, below)
    fit_rows = rows if periodic_eval else DatasetDict(train=rows["train"])
    s = Setup(fit_rows, trainer_kwargs={"reward_funcs": rewards})
    beta = cfg.training.model_extra.get("beta", 0.0)
    # the starting model, for GRPO's KL penalty (beta > 0) and the before/after KL and perplexity
    reference = reference_of(model) if beta or eval_rows else None
    if reference is not None and beta:
        s.trainer_cls = grpo_with_reference(reference)
    if not eval_rows:
        console.warn("task rl: no eval prompts (data.validation_file or validation_split_percentage > 0): "
                      "summary.json gets no reward_before / reward_after")
        return s

    model.to(distributed_state().device)  # sample "before" where training samples (the Trainer keeps it there)

    def measure(policy, when: str) -> dict[str, float]:
        ref = AdapterOff(policy) if reference is None else reference.to(policy.device)
        return policy_eval(policy, tokenizer, eval_rows, rewards, cfg.generation, sections(cfg)[0].eval_samples,
                           cfg.training.seed, ref_model=ref, out_path=run_path / f"samples_{when}.jsonl")

    before = measure(model, "before")
    s.summary = {f"{k}_before": v for k, v in before.items()}
    console.info(f"reward on {len(eval_rows)} eval prompts before training: {before['reward']:.4f}")

    def after_train(trainer) -> dict[str, Any]:
        after = measure(trainer.accelerator.unwrap_model(trainer.model), "after")
        console.info(f"reward on {len(eval_rows)} eval prompts: {before['reward']:.4f} before, {after['reward']:.4f} after")
        return {**s.summary, **{f"{k}_after": v for k, v in after.items()}}

    s.after_train = after_train
    return s
