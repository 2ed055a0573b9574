"""The running batch behind `llmcli serve`: rows join between decode steps and leave when done.

This is continuous batching: instead of one `model.generate` per batch, which runs until its
longest row ends while new requests wait, the engine keeps one batch and its cache alive. Each
step feeds every row its last token; rows that arrived since the last step are prefilled (left-
padded, as `llmcli generate` batches) and their cache joined to the batch's; finished rows leave.

Joining caches: a transformer's key/value cache is left-padded to the longer of the two and
concatenated along the batch (the attention mask marks the padding, and each row's position ids
count only its own tokens, so a row's logits do not depend on its neighbours, as with
`generate`'s left padding); a GRU's cache is its hidden state, concatenated as is. A model whose
cache is of another kind (sliding windows, static caches...) still runs here, but new rows wait
until the batch is empty before they start.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from llmcli.generate.generate import pad_batch
from llmcli.models.gru import GRUCache


class RunningBatch:
    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # Transformers 5.24 renamed it
        self.positions = "position_ids" in params
        self.keep_last = "logits_to_keep" in params
        self.size = 0
        self.cache = self.mask = self.lengths = None

    @property
    def can_join(self) -> bool:
        """Whether rows may join now: always into an empty batch, else only for caches this module can join."""
        return self.size == 0 or _cache_kind(self.cache) is not None

    def add(self, prompts: list[list[int]]):
        """Prefill new rows (appended after the current ones); returns their next-token logits."""
        ids, mask = pad_batch(_Pad(self.pad_id), prompts, self.model.device, left=True)
        logits, cache = self._forward(ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1), None)
        lengths = mask.sum(-1)
        if self.size == 0:
            self.cache, self.mask, self.lengths = cache, mask, lengths
        else:
            self.cache, self.mask = _join(self.cache, self.mask, cache, mask)
            self.lengths = torch.cat([self.lengths, lengths])
        self.size += len(prompts)
        return logits

    def step(self, tokens):
        """Feed each row its chosen token (a tensor of `size`); returns the next-token logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        logits, self.cache = self._forward(tokens.view(-1, 1), self.mask, self.lengths.view(-1, 1), self.cache)
        self.lengths = self.lengths + 1
        return logits

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); the rest leave the batch and its cache."""
        if len(indices) == self.size:
            return
        self.size = len(indices)
        if not indices:
            self.cache = self.mask = self.lengths = None
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused and _cache_kind(self.cache) == "kv":
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _forward(self, ids, mask, positions, cache):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True, self.cache_arg: cache}
        if self.positions:
            kwargs["position_ids"] = positions
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1].float(), cache


class _Pad:
    """What `pad_batch` reads of a tokenizer."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id


def _cache_kind(cache) -> str | None:
    if isinstance(cache, GRUCache):
        return "state"
    if type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers):
        return "kv"
    return None


def _join(cache, mask, new_cache, new_mask):
    """Both caches as one batch (the current rows first); the shorter is padded on the left."""

    width = max(mask.shape[1], new_mask.shape[1])
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])
    if _cache_kind(cache) == "state":  # the GRU reads only the mask's new columns
        cache.update_states(torch.cat([cache.get_states(), new_cache.get_states()], dim=1), 0)
        return cache, mask
    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([F.pad(old.keys, (0, 0, width - old.keys.shape[2], 0)), F.pad(new.keys, (0, 0, width - new.keys.shape[2], 0))])
        old.values = torch.cat([F.pad(old.values, (0, 0, width - old.values.shape[2], 0)),
                                F.pad(new.values, (0, 0, width - new.values.shape[2], 0))])
    return cache, mask
