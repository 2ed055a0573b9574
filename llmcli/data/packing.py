"""Packed prompt/completion rows (`data.packing: true`): several rows in one `max_seq_length` block.

Rows are packed best-fit-decreasing (longest first, each into the block it fills most; rows stay
whole, as TRL's `bfd` packing, without making fine-tuning need TRL). Each block
carries `position_ids` that restart at 0 where a row starts, and no attention mask: Transformers
then confines attention to each row (its packed-sequence masks for SDPA and eager attention, the
varlen path with flash attention), and llmcli's GRU resets its state at each row start. A row's
first label is -100, so the last token of the row before it is not trained to predict it; as
unpacked, the loss is on completion tokens only. So a packed batch computes each row's loss and
gradient as the rows would unpacked (tested at float noise), without the padding.
"""

from __future__ import annotations

from typing import Any


def pack(dataset, max_seq_length: int):
    """Rows (input_ids, labels) -> blocks (input_ids, labels, position_ids) of up to max_seq_length tokens."""
    from datasets import Dataset

    ids, labels = dataset["input_ids"], dataset["labels"]
    blocks = best_fit_decreasing([len(x) for x in ids], max_seq_length)
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for block in blocks:
        out["input_ids"].append([t for i in block for t in ids[i]])
        # a row's first label is never a target of its own row; packed, it would be one of the row before's
        out["labels"].append([label for i in block for label in [-100, *labels[i][1:]]])
        out["position_ids"].append([p for i in block for p in range(len(ids[i]))])
    return Dataset.from_dict(out)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per block: longest rows first, each into the open block with the least room that
    still fits it, else a new block."""
    blocks: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> blocks with exactly that room
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a row of {n} tokens does not fit a block of {capacity}")
        room = next((r for r in range(n, capacity) if by_room.get(r)), None)
        if room is None:
            block, room = len(blocks), capacity
            blocks.append([])
        else:
            block = by_room[room].pop()
        blocks[block].append(i)
        by_room.setdefault(room - n, []).append(block)
    return blocks


class PackedCollator:
    """Batches of blocks, padded to the longest with pad tokens that are one more row of their own
    (positions from 0, labels -100); `use_cache=False`, since a cache would turn off the per-row masks.
    Rows that are not packed (the validation split) are padded as unpacked fine-tuning pads them."""

    def __init__(self, tokenizer):
        import transformers

        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.unpacked = transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "position_ids" not in features[0]:
            return self.unpacked(features)
        width = max(len(f["input_ids"]) for f in features)
        extra = [width - len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor([list(f["input_ids"]) + [self.pad] * n for f, n in zip(features, extra)]),
            "labels": torch.tensor([list(f["labels"]) + [-100] * n for f, n in zip(features, extra)]),
            "position_ids": torch.tensor([list(f["position_ids"]) + list(range(n)) for f, n in zip(features, extra)]),
            "use_cache": False,
        }
