"""Packed prompt/completion fine-tuning (`data.packing`): each row's loss and the batch's gradients equal the
unpacked rows' at float noise (GPT-2 with SDPA and eager attention, and the GRU), a row never sees another row's
tokens, blocks hold every row exactly once, and the CLI trains packed (and refuses packing where it means nothing)."""

import json

import pytest
import torch

from conftest import FIXTURES, read_jsonl, sets
from llmcli.data.packing import PackedCollator, best_fit_decreasing, pack


def gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_positions=64, attn_implementation=attn)
    return GPT2LMHeadModel(config).eval()  # eval: no dropout, so packed and unpacked see the same function


def gru(_):
    import llmcli.models

    llmcli.models.register()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gru", vocab_size=50, hidden_size=32, num_layers=2)).eval()


def tokenizer():
    """A 50-token word-level tokenizer, pad id 0: what the collators read of one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(50)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), pad_token="t0")


def rows(seed=0, n=7):
    """Prompt/completion rows as the data layer makes them: labels -100 on the prompt (none on a row without one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, completion = i % 4, 2 + (3 * i) % 9  # some rows have no prompt: their first token is a label
        ids = torch.randint(1, 50, (prompt + completion,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def token_losses(logits, labels):
    """Cross-entropy of each position's prediction of the next label (-100: no target), as Transformers shifts."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("build, attn", [(gpt2, "sdpa"), (gpt2, "eager"), (gru, None)])
def test_packed_rows_have_the_unpacked_losses_and_gradients(build, attn):
    from datasets import Dataset

    model, data = build(attn), rows()
    blocks = pack(Dataset.from_list(data), 24)
    assert len(blocks) < len(data)  # rows do share blocks
    packed = PackedCollator(tokenizer())(list(blocks))
    assert packed["use_cache"] is False and "attention_mask" not in packed

    # every row alone: the sum of its completion tokens' losses
    with torch.no_grad():
        alone = [float(token_losses(model(torch.tensor([r["input_ids"]])).logits, torch.tensor([r["labels"]])).sum()) for r in data]
    # the packed batch: each row's tokens found by its position ids, its losses summed
    with torch.no_grad():
        losses = token_losses(model(**{k: v for k, v in packed.items() if k != "labels"}).logits, packed["labels"])
    per_row = []
    for b in range(len(blocks)):
        starts = [t for t, p in enumerate(packed["position_ids"][b].tolist()) if p == 0] + [packed["input_ids"].shape[1]]
        per_row += [(packed["input_ids"][b, s:e].tolist(), float(losses[b, s:e].sum())) for s, e in zip(starts, starts[1:])]
    per_row = [(ids, loss) for ids, loss in per_row if set(ids) != {0}]  # not the padding after a short block
    found = {tuple(ids): loss for ids, loss in per_row}
    assert len(per_row) == len(data) and sorted(found) == sorted(tuple(r["input_ids"]) for r in data)
    for r, loss in zip(data, alone):
        assert found[tuple(r["input_ids"])] == pytest.approx(loss, rel=1e-5, abs=1e-6)

    # the model's own loss and its gradients: packed equals the unpacked (padded) batch of the same rows
    def grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    unpacked = PackedCollator(tokenizer())(data)
    assert "position_ids" not in unpacked
    (loss_p, grad_p), (loss_u, grad_u) = grads(packed), grads(dict(unpacked))
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for gp, gu in zip(grad_p, grad_u):
        torch.testing.assert_close(gp, gu, rtol=1e-5, atol=1e-6)

    # a row never sees another: change the first row of block 0, the logits of every other row stay the same
    with torch.no_grad():
        before = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in packed.items() if k != "labels"}
        first_end = ([t for t, p in enumerate(changed["position_ids"][0].tolist()) if p == 0] + [changed["input_ids"].shape[1]])[1]
        changed["input_ids"][0, :first_end] = (changed["input_ids"][0, :first_end] + 7) % 49 + 1
        after = model(**changed).logits
    assert first_end < changed["input_ids"].shape[1]  # block 0 holds another row after the changed one
    assert not torch.allclose(before[0, :first_end], after[0, :first_end])
    torch.testing.assert_close(after[0, first_end:], before[0, first_end:], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


def test_best_fit_decreasing_keeps_every_row_once_and_whole():
    import random

    lengths = [random.Random(i).randint(1, 30) for i in range(200)]
    blocks = best_fit_decreasing(lengths, 32)
    assert sorted(i for block in blocks for i in block) == list(range(200))
    assert all(sum(lengths[i] for i in block) <= 32 for block in blocks)
    assert len(blocks) <= sum(lengths) // 32 + 1 + len(blocks) // 10  # nearly full: at most ~10% more than the bound
    assert best_fit_decreasing([5, 2, 3, 1, 4, 4], 6) == [[0, 3], [4], [5, 1], [2]]
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([7], 6)


def test_finetune_packs_prompt_completion_rows(cli, gpt2_run, tmp_path):
    out = tmp_path / "packed"
    result = cli("finetune", "--model", gpt2_run, *sets(f"data.train_file={FIXTURES / 'instruct.jsonl'}", "data.packing=true",
                 "data.max_seq_length=48", "training.max_steps=8", "training.per_device_train_batch_size=2",
                 "training.learning_rate=3e-3", "training.logging_steps=1"), "-o", out)
    assert "packed into" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["global_step"] == 8
    losses = [e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e]
    assert len(losses) == 8 and losses[-1] < losses[0]
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["packing"] is True and "train_sampling_strategy" not in config["training"]


@pytest.mark.parametrize("extra, message", [
    ((f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}", "data.label_column=sentiment"), "this run's data is labelled"),
    ((f"data.train_file={FIXTURES / 'instruct.jsonl'}", "data.streaming=true", "training.max_steps=2"), "data.streaming=false"),
])
def test_packing_where_it_means_nothing_is_exit_2(cli, gpt2_run, tmp_path, extra, message):
    result = cli("finetune", "--model", gpt2_run, *sets("data.packing=true", *extra), "-o", tmp_path / "x", expect=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
