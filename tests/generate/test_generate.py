"""`llmcli generate` as a Unix filter: inputs, outputs, batching, reproducibility, bad input."""

import json
import subprocess
import sys

import pytest

from conftest import FIXTURES, TINY_GPT2, read_jsonl, sets

PROMPTS = ["ROMEO:", "First Citizen:\\nWe are", "KING", "To be or not", "O", "What say you, my lord?", "JULIET: I"]


def gen(cli, model, *args, **kw):
    return cli("generate", "--model", model, "--max-new-tokens", "8", *args, **kw)


def test_stdin_text_one_line_per_prompt_blank_lines_skipped(cli, gpt2_run):
    result = gen(cli, gpt2_run, "--temperature", "0", input="ROMEO:\n\nJULIET:\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(lines)
    assert result.stderr == "" or "warning" not in result.stderr


def test_greedy_is_independent_of_batch_size_and_order_is_kept(cli, gpt2_run, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    one = gen(cli, gpt2_run, "--input", src, "--temperature", "0", "--batch-size", "1", "--format", "jsonl").stdout
    eight = gen(cli, gpt2_run, "--input", src, "--temperature", "0", "--batch-size", "8", "--format", "jsonl").stdout
    two = gen(cli, gpt2_run, "--input", src, "--temperature", "0", "--batch-size", "2", "--format", "jsonl").stdout
    assert one == eight == two
    records = [json.loads(x) for x in one.splitlines()]
    assert [r["prompt"] for r in records] == [p.replace("\\n", "\n") for p in PROMPTS]
    for r in records:
        assert set(r) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert r["completion_tokens"] <= 8 and r["finish_reason"] in ("length", "stop") and r["prompt_tokens"] > 0


def test_repetition_penalty_counts_each_rows_own_tokens(cli, gpt2_run, tmp_path):
    """A left-padded row's pads (GPT-2's EOS) are not penalized: with a penalty, a row's text does not depend on the
    batch it ran in, and the penalty is Transformers' own over the row alone."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from llmcli.generate.generate import OwnTokensRepetitionPenalty, pad_batch

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    args = ("--input", src, "--temperature", "0", "--repetition-penalty", "1000", "--format", "jsonl")
    assert gen(cli, gpt2_run, *args, "--batch-size", "1").stdout == gen(cli, gpt2_run, *args, "--batch-size", "8").stdout

    eos = 7  # the pad token, and one of the tokens of the rows
    rows = [[5, 7, 9], [3], [7, 7, 1, 2, 4]]
    ids, mask = pad_batch(type("Tok", (), {"pad_token_id": eos}), rows, "cpu", left=True)
    scores = torch.randn(len(rows) * 2, 12, generator=torch.Generator().manual_seed(0))
    scores[:, eos] = 3.0  # the pad token is the best next token of every row
    ids = ids.repeat_interleave(2, 0)  # two sequences per prompt, as generate(num_return_sequences=2)
    got = OwnTokensRepetitionPenalty(1.5, mask, copies=2)(ids, scores.clone())
    hf = RepetitionPenaltyLogitsProcessor(1.5)
    for i, row in enumerate(rows):
        for k in (2 * i, 2 * i + 1):
            assert torch.equal(got[k], hf(torch.tensor([row]), scores[k : k + 1].clone())[0])
    assert got[2, eos] == 3.0 and hf(ids, scores.clone())[2, eos] == 2.0  # Transformers' own would penalize row 1's pads


def test_jsonl_passthrough_and_output_file(cli, gpt2_run, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "prompt": p, "meta": {"k": [i]}}) for i, p in enumerate(PROMPTS)) + "\n\n")
    out = tmp_path / "out.jsonl"
    result = gen(cli, gpt2_run, "--input", src, "--input-format", "jsonl", "--format", "jsonl", "--output", out, "-b", "3", "--seed", "1")
    assert result.stdout == ""
    records = read_jsonl(out)
    assert [r["id"] for r in records] == list(range(len(PROMPTS)))
    assert records[2]["meta"] == {"k": [2]} and records[2]["prompt"] == "KING"


def test_seed_makes_sampling_reproducible(cli, gpt2_run):
    args = ("--prompt", "ROMEO:", "--prompt", "KING", "--temperature", "1.0", "--max-new-tokens", "12")
    a = cli("generate", "--model", gpt2_run, *args, "--seed", "7").stdout
    b = cli("generate", "--model", gpt2_run, *args, "--seed", "7").stdout
    c = cli("generate", "--model", gpt2_run, *args, "--seed", "8").stdout
    assert a == b and a != c


def test_num_return_sequences(cli, gpt2_run):
    out = gen(cli, gpt2_run, "--prompt", "ROMEO:", "-n", "3", "--seed", "0", "--format", "jsonl").stdout
    record = json.loads(out)
    assert len(record["completion"]) == 3 and len(record["finish_reason"]) == 3
    text = gen(cli, gpt2_run, "--prompt", "ROMEO:", "-n", "3", "--seed", "0").stdout
    assert text.count("\n") == 1 and text.count("\t") == 2  # still one line per prompt


def test_stop_strings_cut_the_completion(cli, gpt2_run):
    args = ("generate", "--model", gpt2_run, "--prompt", "ROMEO:", "--temperature", "1", "--seed", "0", "--max-new-tokens", "24",
            "--format", "jsonl")
    completion = json.loads(cli(*args).stdout)["completion"]
    stop = completion.strip()[3:5]
    assert stop.strip() and completion.find(stop) > 0, completion  # a real cut, past the first character
    cut = json.loads(cli(*args, "--stop", stop).stdout)
    assert cut["completion"] == completion[: completion.find(stop)]
    assert cut["finish_reason"] == "stop" and stop not in cut["completion"]
    result = cli(*args, "--stop", "", expect=2)
    assert "generation.stop" in result.stderr and "empty stop string" in result.stderr and result.stdout == ""


def test_closed_pipe_ends_quietly(gpt2_run, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS * 20) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "--model", str(gpt2_run), "--input", str(src), "-b", "4",
                             "--max-new-tokens", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_classifier_labels_lines(cli, classifier_run):
    text = cli("generate", "--model", classifier_run, input="the film is wonderful\nthe film is awful\n").stdout.splitlines()
    assert [line.split("\t")[0] for line in text] == ["positive", "negative"]
    texts = ["the film is wonderful", "the film is awful", "a superb cast"]
    records = [json.loads(x) for x in cli("generate", "--model", classifier_run, "--format", "jsonl",
                                          *[a for t in texts for a in ("--prompt", t)]).stdout.splitlines()]
    reference = _reference_probabilities(classifier_run, texts)  # the model loaded by transformers, no llmcli
    assert len(records) == len(texts)
    for line, record, (labels, probs) in zip(text + [None], records, reference):
        best = max(range(len(probs)), key=probs.__getitem__)
        assert record["label"] == labels[best] and record["score"] == pytest.approx(probs[best], rel=1e-5)
        assert record["scores"] == pytest.approx(dict(zip(labels, probs)), rel=1e-5)
        if line is not None:
            assert line == f"{labels[best]}\t{probs[best]:.4f}"
    assert [r["label"] for r in records] == ["positive", "negative", "positive"]


def _reference_probabilities(model_dir, texts):
    """(label names, softmax probabilities) per text, one unpadded forward pass each, with transformers only."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    out = []
    for t in texts:
        with torch.no_grad():
            logits = model(**tok(t, return_tensors="pt")).logits[0].double()
        out.append((labels, torch.softmax(logits, -1).tolist()))
    return out


def test_long_prompt_is_cut_from_the_left_with_one_warning(cli, gpt2_run, tmp_path):
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(gpt2_run)
    long = "1 2 3 4 5 6 7 8 9 " * 30 + (FIXTURES / "shakespeare_small.txt").read_text()[:600]  # digits first, words last
    ids = tok(long)["input_ids"]
    limit = 128 - 8  # n_positions less max_new_tokens
    last, first = tok.decode(ids[-limit:]), tok.decode(ids[:limit])
    assert len(ids) > 2 * limit and tok(last)["input_ids"] == ids[-limit:] and tok(first)["input_ids"] == ids[:limit]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (long, long, "ROMEO:", last, first)))
    # A strong repetition penalty bars every token of the (kept) prompt, so the output tells which tokens were kept
    result = gen(cli, gpt2_run, "--input", src, "--input-format", "jsonl", "--format", "jsonl", "--temperature", "0",
                 "--repetition-penalty", "1000")
    assert result.stderr.count("warning") == 1 and "2 prompt(s) longer than 120 tokens" in result.stderr
    records = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["prompt_tokens"] for r in records] == [120, 120, len(tok("ROMEO:")["input_ids"]), 120, 120]
    completions = [r["completion"] for r in records]
    assert completions[0] == completions[1] == completions[3]  # the long prompt's last 120 tokens were kept
    assert completions[4] != completions[0]  # not its first 120


def test_empty_prompts_start_from_bos_and_the_rest_is_answered(cli, gpt2_run, tmp_path):
    rows = ["ROMEO:", "", "KING", "", "What say you, my lord?", "<|endoftext|>"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(rows)))
    args = ("--input-format", "jsonl", "--format", "jsonl", "--temperature", "0", "-b", "1")
    records = [json.loads(x) for x in gen(cli, gpt2_run, "--input", src, *args).stdout.splitlines()]
    assert [r["id"] for r in records] == list(range(len(rows)))
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(rows) if p))
    without = {r["id"]: r for r in map(json.loads, gen(cli, gpt2_run, "--input", src, *args).stdout.splitlines())}
    assert all(records[i] == without[i] for i in without)  # the other prompts' answers are unchanged
    # an empty prompt is answered as GPT-2 does: from BOS (here <|endoftext|>, the text of the last row)
    assert records[1]["completion"] == records[3]["completion"] == records[5]["completion"]
    assert records[1]["prompt_tokens"] == 1 and records[1]["prompt"] == ""
    lines = gen(cli, gpt2_run, "--prompt", "", "--prompt", "KING", "--temperature", "0").stdout.splitlines()
    assert lines == [_escape(records[1]["completion"]), _escape(records[2]["completion"])]


def test_empty_prompt_without_bos_or_eos_is_a_per_line_error(cli, gpt2_run, tmp_path):
    import shutil

    model = tmp_path / "no-bos"
    shutil.copytree(gpt2_run, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        config.pop(key, None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"id": 0, "prompt": ""}) + "\n" + json.dumps({"id": 1, "prompt": "ROMEO:"}) + "\n")
    result = gen(cli, model, "--input", src, "--input-format", "jsonl", "--format", "jsonl", "--temperature", "0")
    first, second = map(json.loads, result.stdout.splitlines())
    assert first == {"id": 0, "prompt": "", "error": "empty prompt, and the tokenizer has no BOS or EOS token to start from"}
    assert second["id"] == 1 and second["completion_tokens"] > 0
    assert "1 empty prompt(s) could not be answered" in result.stderr
    text = gen(cli, model, "--prompt", "", "--prompt", "ROMEO:", "--temperature", "0").stdout
    assert text.split("\n") == ["", _escape(second["completion"]), ""]


def _escape(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


@pytest.mark.parametrize(
    "content, fmt, code, message",
    [
        (b"ok\n\xff\xfe bad\n", "text", 4, ":2: not valid UTF-8"),
        (b'{"prompt": "a"}\n{"prompt": \n', "jsonl", 4, ":2: malformed JSON line"),
        (b'{"text": "a"}\n', "jsonl", 4, ":1: expected a JSON object with a string 'prompt' field"),
    ],
)
def test_bad_input_names_the_line(cli, gpt2_run, tmp_path, content, fmt, code, message):
    src = tmp_path / "bad"
    src.write_bytes(content)
    result = gen(cli, gpt2_run, "--input", src, "--input-format", fmt, expect=code)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_path(cli, tmp_path):
    result = cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", expect=2)
    assert "model path not found" in result.stderr and "nope" in result.stderr


def test_checkpoint_selection(cli, tmp_path):

    out = tmp_path / "run"
    cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "training.max_steps=4",
        "training.save_steps=2"), "-o", out)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]

    def outputs(model, *args):
        return gen(cli, model, *args, *prompts, "--temperature", "0", "--format", "jsonl").stdout

    direct = {step: outputs(out / f"checkpoint-{step}") for step in (2, 4)}
    assert direct[2] != direct[4]  # the two checkpoints answer differently, so the comparison below can tell them apart
    assert outputs(out, "--checkpoint", "2") == direct[2]
    assert outputs(out, "--checkpoint", "latest") == direct[4]
    result = gen(cli, out, "--checkpoint", "3", "--prompt", "x", expect=2)
    assert "checkpoints: 2, 4" in result.stderr


def test_relative_run_dir_typo_is_a_path_error(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = cli("generate", "--model", "runs/shakespear", "--prompt", "x", expect=2)
    assert "model path not found: runs/shakespear" in result.stderr


def _run_on_a_terminal(args):
    """Run the CLI with stdout on a pseudo-terminal; returns (exit code, what the terminal showed)."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args)], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b""
    while select.select([master], [], [], 60)[0]:
        try:
            chunk = os.read(master, 1024)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=60)
    return proc.returncode, shown.decode().replace("\r\n", "\n")


def test_streams_one_prompt_to_a_terminal(cli, gpt2_run):
    # sampled with a seed: the tiny model's greedy text is only newlines, which would make the stop string trivial
    args = ["generate", "--model", gpt2_run, "--prompt", "ROMEO:", "--temperature", "1", "--seed", "0", "--max-new-tokens", "16"]
    piped = json.loads(cli(*args, "--format", "jsonl").stdout)["completion"]
    stop = piped.strip()[2:4]
    assert stop.strip() and piped.find(stop) > 0, piped  # a real cut, past the first character
    # on a terminal the tokens stream as they come, and the stop string is cut from what was shown
    code, shown = _run_on_a_terminal([*args, "--stop", stop])
    assert code == 0 and shown == piped[: piped.find(stop)] + "\n"
    # a stop string that never comes: the text held back in case it did is shown at the end of the stream
    assert "@@@" not in piped
    code, shown = _run_on_a_terminal([*args, "--stop", "@@@"])
    assert code == 0 and shown == piped + "\n"


def test_lora_base_model_with_pickle_weights_needs_allow_pickle(cli, gpt2_run, tmp_path):
    """The base model an adapter names is held to the same safetensors-only rule as any model."""
    import shutil

    import torch
    from safetensors.torch import load_file


    base, out = tmp_path / "base", tmp_path / "lora"
    shutil.copytree(gpt2_run, base, ignore=shutil.ignore_patterns("checkpoint-*"))
    cli("finetune", "--model", base, *sets(f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "data.block_size=32",
        "training.max_steps=2", "peft.r=4", "training.learning_rate=1e-2"), "--no-merge", "-o", out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    args = ("--prompt", "ROMEO:", "--temperature", "0", "--format", "jsonl")
    before = gen(cli, out, *args).stdout
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")  # the same weights, as a pickle
    (base / "model.safetensors").unlink()
    result = gen(cli, out, *args, expect=2)
    assert result.stderr.strip() == f"error: {base} has only pickle weights (.bin); set model.allow_pickle=true if you trust the file"
    assert result.stdout == ""
    assert gen(cli, out, *args, "--set", "model.allow_pickle=true").stdout == before


def _read_lines(stream, count, deadline_s):
    """Up to `count` lines from a pipe, waiting at most `deadline_s` seconds in all."""
    import os
    import select
    import time

    data, deadline = b"", time.monotonic() + deadline_s
    while data.count(b"\n") < count and (left := deadline - time.monotonic()) > 0:
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            data += chunk
    return data.decode().splitlines()


def test_slow_stdin_is_answered_when_input_pauses_and_fast_stdin_in_whole_windows(cli, gpt2_run, tmp_path):
    """`tail -f log | llmcli generate`: what has arrived is answered when the input pauses; input that
    arrives at once is batched in whole windows (sampled outputs depend on the batches, so they show it)."""
    fast, slow = PROMPTS + ["QUEEN:"], ["ROMEO:", "JULIET:"]  # 8 prompts: two windows of 4 at -b 1
    args = ["--temperature", "1.0", "--seed", "5", "--max-new-tokens", "6", "-b", "1"]
    src = tmp_path / "fast.txt"
    src.write_text("".join(p + "\n" for p in fast))
    reference = gen(cli, gpt2_run, "--input", src, *args).stdout.splitlines()
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "--model", str(gpt2_run), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(src.read_bytes())  # all at once
        proc.stdin.flush()
        assert _read_lines(proc.stdout, len(fast), 90) == reference
        proc.stdin.write("".join(p + "\n" for p in slow).encode())  # 2 prompts, half a window, then nothing
        proc.stdin.flush()
        answers = _read_lines(proc.stdout, len(slow), 60)  # before the fix: nothing until 4 prompts or EOF
        assert len(answers) == len(slow) and all(answers), answers
        proc.stdin.close()
        assert proc.stdout.read() == b"" and proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_classifier_scores_do_not_depend_on_the_batch(cli, classifier_run):
    short = "the film is wonderful"
    alone = json.loads(cli("generate", "--model", classifier_run, "--format", "jsonl", "--prompt", short).stdout)
    batched = cli("generate", "--model", classifier_run, "--format", "jsonl", "--prompt", short,
                  "--prompt", "honestly , the story was charming and moving and brilliant from start to finish , every scene").stdout
    first = json.loads(batched.splitlines()[0])
    assert first["label"] == alone["label"] and abs(first["score"] - alone["score"]) < 1e-6
