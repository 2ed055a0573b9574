"""`llmcli generate` as a Unix filter: inputs, outputs, batching, reproducibility, bad input."""

import json
import subprocess
import sys

import pytest

from conftest import read_jsonl

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
    base = json.loads(cli("generate", "--model", gpt2_run, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "24", "--format", "jsonl").stdout)
    completion = base["completion"]
    stop = completion.strip()[3:5] if len(completion.strip()) > 5 else completion[:1]
    cut = json.loads(cli("generate", "--model", gpt2_run, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "24",
                         "--format", "jsonl", "--stop", stop).stdout)
    assert cut["completion"] == completion[: completion.find(stop)]
    assert cut["finish_reason"] == "stop" and stop not in cut["completion"]


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
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in text)
    record = json.loads(cli("generate", "--model", classifier_run, "--format", "jsonl", "--prompt", "a superb cast").stdout)
    assert record["label"] == "positive" and set(record["scores"]) == {"negative", "positive"}
    assert abs(sum(record["scores"].values()) - 1) < 1e-5


def test_long_prompt_is_cut_from_the_left_with_one_warning(cli, gpt2_run):
    long = "to be or not to be " * 200
    result = gen(cli, gpt2_run, "--prompt", long, "--prompt", long, "--prompt", "ROMEO:", "--format", "jsonl", "--temperature", "0")
    assert result.stderr.count("warning") == 1 and "2 prompt(s) longer than 120 tokens" in result.stderr
    assert [json.loads(x)["prompt_tokens"] for x in result.stdout.splitlines()][:2] == [120, 120]


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
    from conftest import FIXTURES, TINY_GPT2, sets

    out = tmp_path / "run"
    cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "training.max_steps=4",
        "training.save_steps=2"), "-o", out)
    for ckpt in ("latest", "2"):
        assert gen(cli, out, "--checkpoint", ckpt, "--prompt", "ROMEO:").stdout.strip()
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
    args = ["generate", "--model", gpt2_run, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "16"]
    piped = json.loads(cli(*args, "--format", "jsonl").stdout)["completion"]
    code, shown = _run_on_a_terminal(args)
    assert code == 0 and shown == piped + "\n"
    stop = piped.strip()[2:4]
    code, shown = _run_on_a_terminal([*args, "--stop", stop])
    assert code == 0 and shown == piped[: piped.find(stop)] + "\n"


def test_endless_stdin_is_answered_window_by_window(gpt2_run):
    """`tail -f prompts | llmcli generate`: a window's answers come out before the input ends."""
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "--model", str(gpt2_run), "-b", "1", "--max-new-tokens", "3",
                             "--temperature", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"ROMEO:\nJULIET:\nKING:\nO\n")  # one window: batch size 1 x 4 batches
    proc.stdin.flush()
    first = [proc.stdout.readline() for _ in range(4)]  # would block forever if generate waited for EOF
    assert all(first)
    proc.stdin.write(b"QUEEN:\n")
    proc.stdin.close()
    rest = proc.stdout.read().splitlines()
    assert proc.wait(timeout=60) == 0 and len(rest) == 1


def test_classifier_scores_do_not_depend_on_the_batch(cli, classifier_run):
    short = "the film is wonderful"
    alone = json.loads(cli("generate", "--model", classifier_run, "--format", "jsonl", "--prompt", short).stdout)
    batched = cli("generate", "--model", classifier_run, "--format", "jsonl", "--prompt", short,
                  "--prompt", "honestly , the story was charming and moving and brilliant from start to finish , every scene").stdout
    first = json.loads(batched.splitlines()[0])
    assert first["label"] == alone["label"] and abs(first["score"] - alone["score"]) < 1e-6
