"""The GRU architecture (llmcli/models/gru.py): registry, save/load, padding, cache, generate, heads.

References are independent of the model code: the GRU equations written out by hand, plain
cross-entropy, each prompt run on its own, full re-runs without a cache.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES

HIDDEN, LAYERS = 32, 2
PROMPTS = ["ROMEO:", "First Citizen:\nWe are accounted poor", "KING", "To be or not", "O", "What say you, my lord?",
           "JULIET: I would", "Before we proceed any further, hear me speak."]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(FIXTURES / "shakespeare_small.txt").read_text()], trainer=trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special, unk_token=special)


def make_config(tokenizer, **overrides):
    import llmcli.models

    llmcli.models.register()
    from transformers import AutoConfig

    args = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_layers=LAYERS, dropout=0.1,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return AutoConfig.for_model("gru", **{**args, **overrides})


@pytest.fixture(scope="module")
def lm(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(tokenizer, initializer_range=0.5)).eval()  # varied greedy output


def left_pad(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """The GRU equations by hand, from the model's weights: embedding -> GRU layers -> head."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    xs = [sd["model.embed_tokens.weight"][i] for i in ids]
    for layer in range(LAYERS):
        w_ih, w_hh = sd[f"model.gru.weight_ih_l{layer}"], sd[f"model.gru.weight_hh_l{layer}"]
        b_ih, b_hh = sd[f"model.gru.bias_ih_l{layer}"], sd[f"model.gru.bias_hh_l{layer}"]
        h, outs = torch.zeros(HIDDEN), []
        for x in xs:
            gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
            r = torch.sigmoid(gi[:HIDDEN] + gh[:HIDDEN])
            z = torch.sigmoid(gi[HIDDEN : 2 * HIDDEN] + gh[HIDDEN : 2 * HIDDEN])
            n = torch.tanh(gi[2 * HIDDEN :] + r * gh[2 * HIDDEN :])
            h = (1 - z) * n + z * h
            outs.append(h)
        xs = outs
    return torch.stack(xs) @ sd["lm_head.weight"].T


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Registry and save/load


def test_import_llmcli_and_registry_leave_torch_unloaded():
    code = "import sys, llmcli, llmcli.models as m; assert m.CUSTOM_MODELS['gru'] == 'causal-lm'; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_register_is_idempotent_and_fills_every_auto_class(tokenizer):
    import llmcli.models
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmcli.models.gru import GRUForCausalLM, GRUForSequenceClassification, GRUModel

    llmcli.models.register()
    llmcli.models.register()
    config = make_config(tokenizer)
    assert type(AutoModelForCausalLM.from_config(config)) is GRUForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is GRUForSequenceClassification
    assert type(AutoModel.from_config(config)) is GRUModel
    assert config.num_hidden_layers == LAYERS  # HF's generic name maps to num_layers


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_with_plain_auto_classes(tokenizer, tmp_path, tied):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(make_config(tokenizer, tie_word_embeddings=tied)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gru" and saved["architectures"] == ["GRUForCausalLM"]
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))

    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert ("lm_head.weight" in keys) is not tied  # a tied head is stored once, as the embedding

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "GRUConfig"
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids = left_pad(tokenizer, PROMPTS[:3])
    assert torch.equal(model(**ids).logits, loaded(**ids).logits)


def test_resize_token_embeddings_keeps_tie_and_rows(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(make_config(tokenizer)).eval()
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(tokenizer) + 20)
    emb = model.get_input_embeddings()
    assert emb.weight.shape == (len(tokenizer) + 20, HIDDEN) and model.config.vocab_size == len(tokenizer) + 20
    assert model.lm_head.weight is emb.weight
    assert torch.equal(emb.weight[: len(tokenizer)], old)
    assert model(torch.tensor([[len(tokenizer) + 19, 5]])).logits.shape == (1, 2, len(tokenizer) + 20)


# --------------------------------------------------------------------------------------------
# Forward: the equations, padding, loss


def test_logits_match_the_gru_equations_by_hand(lm, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0]
    close(logits, reference_logits(lm, ids))


def test_left_and_right_padding_give_the_unpadded_logits(lm, tokenizer):
    singles = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        alone = [lm(torch.tensor([ids])).logits[0] for ids in singles]
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
            assert (batch["attention_mask"] == 0).any()
            logits = lm(**batch).logits
            for row, ids in enumerate(singles):
                mask = batch["attention_mask"][row].bool()
                close(logits[row][mask], alone[row])
                assert mask.sum() == len(ids)


def test_lm_loss_equals_shifted_cross_entropy_ignoring_minus_100(lm, tokenizer):
    tokenizer.padding_side = "right"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, 1] = -100
    with torch.no_grad():
        out = lm(**batch, labels=labels)
    ref_logits = torch.cat([reference_logits(lm, row[m.bool()].tolist())[:-1] for row, m in zip(batch["input_ids"], batch["attention_mask"])])
    ref_labels = torch.cat([row[m.bool()][1:] for row, m in zip(labels, batch["attention_mask"])])
    expected = F.cross_entropy(ref_logits, ref_labels, ignore_index=-100)
    assert (ref_labels != -100).sum() == int(batch["attention_mask"].sum()) - len(PROMPTS) - 1
    close(out.loss, expected)


def test_dropout_is_active_in_training_only(tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(make_config(tokenizer, dropout=0.5))
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------------------------
# The state cache and generate


def test_cached_steps_equal_full_reruns_and_cost_one_step(lm, tokenizer):
    batch = left_pad(tokenizer, PROMPTS[:4])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    steps = []
    hook = lm.model.gru.register_forward_hook(lambda mod, inp, out: steps.append(inp[0]))
    try:
        with torch.no_grad():
            out = lm(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            for _ in range(5):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
                out = lm(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                full = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
                close(out.logits[:, -1], full)
    finally:
        hook.remove()
    assert cache.get_seq_length() == ids.shape[1]
    cached_steps = steps[1::2]  # prefill, then (cached step, full re-run) pairs
    assert [tuple(s.shape[:2]) for s in cached_steps] == [(4, 1)] * 5


def test_greedy_generate_is_identical_for_batch_sizes_1_2_8(lm, tokenizer):
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    results = {}
    for size in (1, 2, 8):
        completions = []
        for start in range(0, len(PROMPTS), size):
            batch = left_pad(tokenizer, PROMPTS[start : start + size])
            with torch.no_grad():
                out = lm.generate(**batch, **kwargs)
            completions += out[:, batch["input_ids"].shape[1] :].tolist()
        results[size] = completions
    assert results[1] == results[2] == results[8]
    assert all(len(c) == 12 for c in results[1]) and len({tuple(c) for c in results[1]}) > 1


def test_generate_with_cache_equals_generate_without(lm, tokenizer):
    batch = left_pad(tokenizer, PROMPTS)
    kwargs = dict(max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True, do_sample=False)
    with torch.no_grad():
        cached = lm.generate(**batch, use_cache=True, **kwargs)
        uncached = lm.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        close(a, b)


def test_sampling_with_num_return_sequences_expands_the_state(lm, tokenizer):
    batch = left_pad(tokenizer, PROMPTS[:3])
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(7)
        expanded = lm.generate(**batch, num_return_sequences=3, **kwargs)
        repeated = {k: v.repeat_interleave(3, dim=0) for k, v in batch.items()}
        torch.manual_seed(7)
        by_hand = lm.generate(**repeated, **kwargs)
    assert expanded.shape == (9, batch["input_ids"].shape[1] + 10)
    assert torch.equal(expanded, by_hand)


def test_beam_search_reorders_the_state(lm, tokenizer):
    batch = left_pad(tokenizer, PROMPTS[:3])
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        cached = lm.generate(**batch, use_cache=True, **kwargs)
        uncached = lm.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_stop_strings_end_generation(lm, tokenizer):
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, max_new_tokens=12)
    cases = 0
    with torch.no_grad():
        for prompt in PROMPTS:
            batch = tokenizer([prompt], return_tensors="pt")
            free = lm.generate(**batch, **kwargs)[0, batch["input_ids"].shape[1] :].tolist()
            # the first generated token (after the first) whose text is new: stopping on it ends right there
            texts = [tokenizer.decode(free[k : k + 1]) for k in range(12)]
            at = next((k for k in range(1, 12) if texts[k].strip() and "\ufffd" not in texts[k]
                       and texts[k] not in tokenizer.decode(free[:k])), None)
            if at is None:
                continue
            stopped = lm.generate(**batch, stop_strings=[texts[at]], tokenizer=tokenizer, **kwargs)
            assert stopped[0, batch["input_ids"].shape[1] :].tolist() == free[: at + 1]
            cases += 1
    assert cases >= 3


def test_llmcli_generate_greedy_same_for_batch_sizes(cli, lm, tokenizer, tmp_path):
    """The real `llmcli generate` path (left padding, length-sorted windows) on a saved GRU."""
    lm.save_pretrained(tmp_path / "gru")
    tokenizer.save_pretrained(tmp_path / "gru")
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(p.replace("\n", "\\n") for p in PROMPTS) + "\n")
    outs = [cli("generate", "--model", tmp_path / "gru", "--input", src, "--temperature", "0", "--max-new-tokens", "8",
                "--batch-size", size, "--format", "jsonl").stdout for size in (1, 2, 8)]
    assert outs[0] == outs[1] == outs[2] and len(outs[0].splitlines()) == len(PROMPTS)


# --------------------------------------------------------------------------------------------
# Classification head


def test_classifier_pools_the_last_real_token_whatever_the_padding(tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(4)
    config = make_config(tokenizer, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    clf = AutoModelForSequenceClassification.from_config(config).eval()
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 1, 0])
    with torch.no_grad():
        alone = torch.cat([clf(torch.tensor([tokenizer(p)["input_ids"]])).logits for p in PROMPTS])
        # by hand: the head applied to the top GRU state after the last token (LM weights = same backbone)
        ref = torch.stack([clf.score(_top_state(clf.model, tokenizer(p)["input_ids"])) for p in PROMPTS])
        close(alone, ref)
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
            out = clf(**batch, labels=labels)
            close(out.logits, alone)
            close(out.loss, F.cross_entropy(alone, labels))
        tokenizer.padding_side = "right"  # no mask: the pad token id marks the end, as in GPT-2
        unmasked = clf(input_ids=tokenizer(PROMPTS, return_tensors="pt", padding=True)["input_ids"]).logits
        close(unmasked, alone)


def _top_state(backbone, ids):
    emb = backbone.embed_tokens.weight[ids].unsqueeze(0)
    _, h_n = backbone.gru(emb)
    return h_n[-1, 0]


def test_classifier_loads_the_backbone_of_a_saved_lm(lm, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lm.save_pretrained(tmp_path)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    for key, value in lm.model.state_dict().items():
        assert torch.equal(clf.model.state_dict()[key], value), key
    assert clf.score.weight.shape == (2, HIDDEN)


def test_trainer_steps_lower_the_loss(tokenizer, tmp_path):
    """Two Trainer steps on one batch: Trainer's loss kwargs (num_items_in_batch) reach the model."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(make_config(tokenizer, dropout=0.0))
    ids = tokenizer(PROMPTS[1])["input_ids"][:8]
    data = [{"input_ids": ids, "labels": ids}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=5)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[2] < losses[0]
