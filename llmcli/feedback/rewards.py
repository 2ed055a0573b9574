"""Rewards and measuring a policy: `reward:` as a reward for GRPO (a classifier's probability, a
reward model's score or `module:function`), and the rl before/after numbers (reward, KL to the
reference, the reference's perplexity of samples). Scoring texts with a model in memory, and a
reward model's preference accuracy, are the evaluate wing's (`evaluate/scoring.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from llmcli.config import Config, GenerationSection, ModelSection, RewardSection
from llmcli.data.preferences import is_conversation
from llmcli.dist import is_main_process
from llmcli.errors import ConfigError
from llmcli.evaluate.metrics import safe_exp
from llmcli.evaluate.scoring import Scorer
from llmcli.models import heads, load
from llmcli.tasks import Task


class Reward:
    """A reward for GRPO, called as TRL calls one: `reward(prompts, completions, **columns)` -> one
    float per completion, `columns` holding the rows' other columns (a list each)."""

    __name__ = "reward"
    weight = 1.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
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


def sections(cfg: Config) -> list[RewardSection]:
    """`reward:` as a list (one section, or the list given)."""
    if cfg.reward is None:
        return []
    return list(cfg.reward) if isinstance(cfg.reward, list) else [cfg.reward]


def reward_functions(cfg: Config, device: str | None = None) -> list[Reward]:
    """`reward:` as GRPO's reward functions, each named for the logs (`rewards/<name>/mean`)."""
    from llmcli.dist import distributed_state, is_distributed

    if device is None and is_distributed():
        device = str(distributed_state().device)  # each rank scores its own completions on its own device
    out: list[Reward] = []
    for r in sections(cfg):
        reward = FunctionReward(r.function) if r.function is not None else ModelReward(r.model, r.label, r.batch_size, cfg.model, device)
        taken = [x.__name__ for x in out]
        if reward.__name__ in taken:  # two rewards of one name: number the later ones
            reward.__name__ = f"{reward.__name__}_{len(out)}"
        reward.weight = r.weight  # GRPO gets the same weights (training.reward_weights, feedback.setup)
        out.append(reward)
    return out


class FunctionReward(Reward):
    """`module:function`: a list of texts (prompt + completion) in, one float per text out. The
    function also gets, by parameter name, `prompts`, `completions` and any other column of the
    rows (all of them if it takes **kwargs), as TRL's reward functions do: a verifiable reward
    reads an `answer` column."""

    def __init__(self, ref: str):
        import inspect

        from llmcli.tasks import load_object

        if ":" not in ref:
            raise ConfigError(f"reward.function: '{ref}' should be 'module:function'")
        try:
            self.fn = load_object(ref)  # a module in the current directory too
        except ConfigError as err:
            raise ConfigError(f"reward.function: {err}") from None
        if not callable(self.fn):
            raise ConfigError(f"reward.function: '{ref}' is not callable")
        self.ref = ref
        self.__name__ = ref.rpartition(":")[2]
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            params = []
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        self.named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def __call__(self, prompts, completions, **columns) -> list[float]:
        columns = {**columns, "prompts": list(prompts), "completions": list(completions)}
        passed = columns if self.takes_all else {k: v for k, v in columns.items() if k in self.named}
        texts = [join_text(p, c) for p, c in zip(prompts, completions)]
        return self._checked(self.fn(texts, **passed), len(texts))

    def _checked(self, out, n: int) -> list[float]:
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ConfigError(f"reward.function: '{self.ref}' must return a list of numbers, got {type(out).__name__}") from None
        if len(values) != n:
            raise ConfigError(f"reward.function: '{self.ref}' returned {len(values)} values for {n} texts")
        return values


def check_reward_model(path: str, label: str | None, m: ModelSection) -> None:
    """reward.model is a classifier with `label`, or a reward model without one (its config only)."""
    config = load.inference_config(load.resolve_model_path(path), m)
    kind = heads.task_of_model(config)
    if kind != Task.CLASSIFICATION:
        raise ConfigError(f"reward.model: {path} is a {kind} model; it must be a classifier or a reward model")
    labels = [str(v) for _, v in sorted((int(k), v) for k, v in config.id2label.items())]
    if heads.is_reward_model(config):
        if label is not None:
            raise ConfigError(f"reward.label: {path} is a reward model (one score per text); remove reward.label")
    elif label is None:
        raise ConfigError(f"reward.label: {path} is a classifier; name the label whose probability is the reward (one of {', '.join(labels)})")
    elif label not in labels:
        raise ConfigError(f"reward.label: '{label}' is not a label of {path} (labels: {', '.join(labels)})")


class ModelReward(Scorer, Reward):
    """A classifier's probability of `label`, or a reward model's score (its one logit), for each
    text; conversations are scored in the model's chat template, the format it was trained on."""

    def __init__(self, path: str, label: str | None, batch_size: int, m: ModelSection, device: str | None = None):
        resolved = load.resolve_model_path(path)
        inference = ModelSection(trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
        check_reward_model(path, label, m)
        model, tokenizer, _ = load.load_for_inference(resolved, inference, device, "float32")
        if heads.is_reward_model(model.config):
            super().__init__(model, tokenizer, batch_size)
            self.__name__ = "reward_model"
        else:
            index = {v: int(k) for k, v in model.config.id2label.items()}[label]
            super().__init__(model, tokenizer, batch_size, is_reward_model=False, index=index)
            self.__name__ = f"p_{label}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if is_conversation(prompts[0]) and getattr(self.tokenizer, "chat_template", None):
            as_messages = [(p if isinstance(p, list) else [{"role": "user", "content": p}]) +
                           (c if isinstance(c, list) else [{"role": "assistant", "content": c}]) for p, c in zip(prompts, completions)]
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False) for m in as_messages]
            return self.score(texts, add_eos=False)  # the template ends each turn itself
        return self.score([join_text(p, c) for p, c in zip(prompts, completions)])


def policy_eval(model, tokenizer, rows: list[dict], rewards: list[Reward], g: GenerationSection, samples: int, seed: int,
                ref_model=None, out_path: Path | None = None) -> dict[str, float]:
    """Sample `samples` completions per row's prompt with the run's sampling settings (seeded, the
    global RNG untouched) and score them as GRPO does: each reward called with the prompts, the
    completions and the rows' other columns, summed with the rewards' weights. With `ref_model`,
    also GRPO's per-token KL estimate (k3) of policy vs reference on those samples and the
    reference's perplexity of the completions. The policy itself is the reference when `ref_model` is None."""
    import torch

    from llmcli.generate.generate import eos_ids, finish, generate_kwargs, pad_batch

    was_training = model.training
    model.eval()
    out_rows, kl_sum, nll_sum, n_tokens = [], 0.0, 0.0, 0
    eos = eos_ids(model, tokenizer)
    cut = g.model_copy(update={"stop": []})
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            batch = max(1, g.batch_size // samples)
            for b in range(0, len(rows), batch):
                chunk = rows[b : b + batch]
                ids = [_prompt_ids(tokenizer, r["prompt"]) for r in chunk]
                input_ids, mask = pad_batch(tokenizer, ids, model.device, left=True)
                kwargs = generate_kwargs(tokenizer, g, mask, num_return_sequences=samples)
                kwargs["min_new_tokens"] = g.min_new_tokens
                out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
                new = out[:, input_ids.shape[1] :]
                for j, seq in enumerate(new.tolist()):
                    text, count, _ = finish(tokenizer, seq, eos, cut)
                    out_rows.append({**chunk[j // samples], "completion": text, "completion_tokens": count})
                stats = _token_stats(model, ref_model, out, input_ids.shape[1], mask.repeat_interleave(samples, 0),
                                     eos, g.temperature or 1.0)
                kl_sum += stats[0]
                nll_sum += stats[1]
                n_tokens += stats[2]
    finally:
        model.train(was_training)
    prompts = [r["prompt"] for r in out_rows]
    # a conversation's completion is an assistant message, as GRPO hands it to its reward functions
    completions = [[{"role": "assistant", "content": r["completion"]}] if is_conversation(r["prompt"]) else r["completion"]
                   for r in out_rows]
    columns = {k: [r[k] for r in out_rows] for k in rows[0] if k != "prompt"}
    per_reward = {reward.__name__: reward(prompts, completions, **columns) for reward in rewards}
    totals = [sum(reward.weight * per_reward[reward.__name__][i] for reward in rewards) for i in range(len(out_rows))]
    for i, row in enumerate(out_rows):
        row["reward"] = totals[i]
        if len(rewards) > 1:
            row["rewards"] = {name: values[i] for name, values in per_reward.items()}
    if out_path is not None and is_main_process():
        out_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    result = {
        "reward": sum(totals) / len(totals),
        "completion_tokens": sum(r["completion_tokens"] for r in out_rows) / len(out_rows),
        "kl": kl_sum / n_tokens if n_tokens else 0.0,
        "ref_perplexity": safe_exp(nll_sum / n_tokens) if n_tokens else None,
    }
    if len(rewards) > 1:
        result.update({f"reward_{name}": sum(values) / len(values) for name, values in per_reward.items()})
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

