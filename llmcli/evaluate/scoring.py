"""Scoring whole texts with a classifier or reward model in memory, and a reward model's preference
accuracy on chosen/rejected pairs (`llmcli eval` of a `task: reward` run, and that run's summary).
The feedback wing's `ModelReward` loads a scorer by path for GRPO.
"""

from __future__ import annotations

from typing import Any

from llmcli.data.preferences import is_conversation
from llmcli.models.load import context_is_a_limit, context_length


class Scorer:
    """Scores texts with a sequence classifier: its logit `index` when it is a reward model (one
    output), else the softmax probability of class `index`.

    A text longer than the model's context is cut from the left: what is judged is the end, the
    completion, not the prompt. A model without a hard context (llmcli's GRU) reads it whole."""

    def __init__(self, model, tokenizer, batch_size: int, is_reward_model: bool = True, index: int = 0):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.is_reward_model, self.index = is_reward_model, index
        self.context = (context_length(model.config) or 512) if context_is_a_limit(model.config) else None
        self.warned = False

    def score(self, texts: list[str], add_eos: bool = True) -> list[float]:
        import torch

        eos = self.tokenizer.eos_token
        if self.is_reward_model and add_eos and eos:  # as TRL's RewardTrainer trained it: EOS at the end, once
            texts = [t if t.endswith(eos) else t + eos for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0.0] * len(texts)
        self.tokenizer.padding_side = "right"  # absolute positions start at 0
        self.tokenizer.truncation_side = "left"
        was_training = self.model.training
        self.model.eval()
        cut = 0
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                batch = [texts[i] for i in idx]
                enc = self.tokenizer(batch, padding=True, return_tensors="pt")
                if self.context is not None and enc["input_ids"].shape[1] > self.context:  # encoded again only then
                    cut += int((enc["attention_mask"].sum(1) > self.context).sum())
                    enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.context, return_tensors="pt")
                enc = enc.to(self.model.device)
                with torch.inference_mode():
                    logits = self.model(**enc).logits.float()
                values = logits[:, 0] if self.is_reward_model else torch.softmax(logits, dim=-1)[:, self.index]
                for i, v in zip(idx, values.tolist()):
                    out[i] = v
        finally:
            self.model.train(was_training)
        self._warn_if_cut(cut, len(texts))
        return out

    def _warn_if_cut(self, cut: int, total: int) -> None:
        """One warning per scorer, counting the cut texts of the first call that cut any."""
        if cut and not self.warned:
            from llmcli import console

            console.warn(f"{cut} of {total} texts are longer than the scoring model's context ({self.context} tokens): "
                         "cut from the left, keeping the completion (warned once)")
            self.warned = True


def preference_accuracy(scorer: Scorer, rows) -> dict[str, Any]:
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
