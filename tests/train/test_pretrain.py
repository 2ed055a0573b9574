"""End to end `llmcli pretrain` on tiny GPT-2 and BERT models, through the real CLI."""

import json
import math

import pytest

from conftest import FIXTURES, TINY_BERT, TINY_GPT2, read_jsonl, sets

TEXT = FIXTURES / "shakespeare_small.txt"


def pretrain_args(out, *extra):
    return ["pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", *extra), "-o", out]


def test_gpt2_run_dir_has_everything(gpt2_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "config.json", "tokenizer.json"):
        assert (gpt2_run / name).exists(), name
    summary = json.loads((gpt2_run / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "perplexity", "global_step", "train_tokens", "train_tokens_per_second", "train_runtime_s"):
        assert summary[key] is not None, key
    assert summary["global_step"] == 40
    assert summary["task"] == "causal-lm"
    assert summary["train_tokens"] == 40 * 8 * 32
    assert math.isclose(summary["perplexity"], math.exp(summary["eval_loss"]), rel_tol=1e-6)
    assert summary["resumed_from"] is None

    events = read_jsonl(gpt2_run / "metrics.jsonl")
    losses = [e["loss"] for e in events if "loss" in e]
    assert len(losses) == 8 and all("learning_rate" in e for e in events if "loss" in e)
    assert any("eval_loss" in e and "eval_perplexity" in e for e in events)

    # The saved model and tokenizer load with plain transformers, and learned the training text.
    model = AutoModelForCausalLM.from_pretrained(gpt2_run)
    tok = AutoTokenizer.from_pretrained(gpt2_run)
    ids = tok(TEXT.read_text()[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < losses[0] - 1.0, (loss, losses[0])
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)

    # config.yaml is the resolved config and is itself a valid --config
    from llmcli.config import load_config

    cfg = load_config(gpt2_run / "config.yaml")
    assert cfg.training.max_steps == 40 and cfg.model.config_overrides["n_layer"] == 2
    assert "# transformers:" in (gpt2_run / "config.yaml").read_text()


def test_resume_continues_from_latest_checkpoint(cli, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(out, "training.max_steps=6", "training.save_steps=3"))
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    # The same command with a longer budget resumes from checkpoint-6 instead of starting over.
    result = cli(*pretrain_args(out, "training.max_steps=10", "training.save_steps=3"))
    assert "resuming from" in result.stderr and "checkpoint-6" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 6 and summary["global_step"] == 10
    steps = [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e]
    assert steps == [5, 10]  # logged once before the interruption point, once after: nothing replayed


def test_start_over_needs_overwrite(cli, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(out, "training.max_steps=2", "training.save_steps=2"))
    result = cli(*pretrain_args(out, "training.max_steps=2"), "--no-resume", expect=2)
    assert "--overwrite" in result.stderr and str(out) in result.stderr
    cli(*pretrain_args(out, "training.max_steps=3"), "--no-resume", "--overwrite")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from"] is None


def test_resume_refuses_changed_architecture(cli, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(out, "training.max_steps=2", "training.save_steps=2"))
    result = cli(*pretrain_args(out, "training.max_steps=4", "model.config_overrides.n_layer=3"), expect=2)
    assert "model.config_overrides" in result.stderr


def test_bert_masked_lm_from_scratch(cli, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "bert"
    cli("pretrain", *sets(*TINY_BERT, f"data.train_file={TEXT}", "training.max_steps=8"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "masked-lm" and summary["global_step"] == 8
    assert math.isfinite(summary["eval_loss"])
    model = AutoModelForMaskedLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "[MASK]" and model.config.model_type == "bert"
    enc = tok("to be or not to be")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id


def test_gpt2_bpe_dir_as_tokenizer(cli, tmp_path):
    """A local dir holding GPT-2's vocab.json/merges.txt works as model.tokenizer_name."""
    from transformers import AutoTokenizer

    bpe = tmp_path / "bpe"
    bpe.mkdir()
    # the 256 byte-level symbols GPT-2's vocab starts with, one merge, and the end-of-text token
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({"th": 256, "<|endoftext|>": 257})
    (bpe / "vocab.json").write_text(json.dumps(vocab))
    (bpe / "merges.txt").write_text("#version: 0.2\nt h\n")
    out = tmp_path / "run"
    cli(*pretrain_args(out, "training.max_steps=2", f"model.tokenizer_name={bpe}"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("th") == 256 and tok("the")["input_ids"][0] == 256


def test_tokenized_cache_is_reused_and_keyed(cli, tmp_path):
    first = cli(*pretrain_args(tmp_path / "a", "training.max_steps=1", "data.block_size=24"))
    assert "cache miss" in first.stderr
    again = cli(*pretrain_args(tmp_path / "b", "training.max_steps=1", "data.block_size=24"))
    assert "tokenized cache hit" in again.stderr and "cache miss" not in again.stderr
    other = cli(*pretrain_args(tmp_path / "c", "training.max_steps=1", "data.block_size=20"))
    assert "cache miss" in other.stderr


def test_dry_run_trains_nothing(cli, tmp_path):
    def tree():
        return sorted((str(p.relative_to(tmp_path)), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    out = tmp_path / "run"
    result = cli(*pretrain_args(out, "training.max_steps=5"), "--dry-run")
    assert "max_steps: 5" in result.stdout
    assert "  would resume from: nothing (fresh start)\n" in result.stderr and f"  output_dir: {out}\n" in result.stderr
    assert not out.exists()
    cli(*pretrain_args(out, "training.max_steps=2", "training.save_steps=2"))
    before = tree()
    result = cli(*pretrain_args(out, "training.max_steps=5"), "--dry-run")
    assert f"  would resume from: {out / 'checkpoint-2'}\n" in result.stderr
    assert tree() == before  # nothing written, nothing touched


def test_bf16_on_cpu_falls_back_with_warning(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    result = cli(*pretrain_args(tmp_path / "run", "training.max_steps=1", "training.bf16=true"))
    assert "bf16" in result.stderr and "fp32" in result.stderr
