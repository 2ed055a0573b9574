"""GRU benchmarks (llmcli/models/gru.py): generation speed, and perplexity against GPT-2 and a unigram.

(a) Generation, on a saved GRU: `--model DIR`, or one built here with random weights (speed does
    not depend on them) and a BPE trained on Tiny Shakespeare, by default the shape of
    configs/shakespeare-gru.yaml (2x256, vocab 2048; `--hidden 512 --vocab 10000` is the issue's
    example), saved and loaded back with `AutoModelForCausalLM`:
    - 64 prompts x 32 new tokens, greedy: a one-prompt-at-a-time `model.generate` loop vs one
      batched, left-padded `model.generate` call vs llmcli's generate path (target >= 10x the loop);
    - 32 new tokens after a 16-token and after a 256-token prompt, one prompt, median of --repeats
      (target: < 2x apart, as each new token costs one GRU step from the cached state); the same
      256-token prompt without the cache (a re-run of the prefix per token) for contrast.
(b) `--perplexity`: `llmcli pretrain` on configs/shakespeare.yaml (GPT-2 demo) and
    configs/shakespeare-gru.yaml (same tokenizer, data, blocks, batch and steps), then `llmcli eval`
    of both on the held-out 5% of Tiny Shakespeare, next to a unigram model (add-one-smoothed token
    frequencies of the training split, same tokenizer). Target: GRU perplexity <= unigram / 3.
    Reports tokens/s and wall-clock of both runs. `--quick` trains 60 steps (a smoke run).

    python scripts/bench_gru.py                        # (a), a few minutes on 2 CPU cores
    python scripts/bench_gru.py --hidden 512 --vocab 10000
    python scripts/bench_gru.py --model runs/shakespeare-gru
    python scripts/bench_gru.py --perplexity           # (b), two ~5-10 minute trainings on 2 CPU cores
    python scripts/bench_gru.py --perplexity --quick

Prints tables; writes bench-out/gru-generate.json and bench-out/gru-perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's llmcli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a saved GRU (model dir or llmcli run dir); default: build one (--hidden, --layers, --vocab)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--text", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a machine shared with other jobs")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each prompt-length case (median counts)")
    ap.add_argument("--perplexity", action="store_true", help="run (b) instead of (a)")
    ap.add_argument("--quick", action="store_true", help="(b): 60 training steps instead of the configs' 600")
    ap.add_argument("--llmcli", default=f"{shlex.quote(sys.executable)} -m llmcli", help="(b): the llmcli command to run")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.perplexity:
        perplexity(args)
    else:
        generation(args)


# --------------------------------------------------------------------------------------------
# (a) generation speed


def generation(args) -> None:
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcli.models
    from llmcli.generate import generate
    from llmcli.config import load_config
    from llmcli.generate.prompts import Prompt

    llmcli.models.register()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or _build_gru(Path(tmp) / "gru", args)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # every row generates exactly --new-tokens tokens (random weights emit EOS early otherwise)
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    c = model.config
    about = f"GRU {c.num_layers}x{c.hidden_size}, vocab {c.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    lines = [x for x in Path(args.text).read_text().splitlines() if x.strip()]
    prompts = [" ".join(lines[i * 7 : i * 7 + 1 + i % 4]) for i in range(args.prompts)]  # 1 to 4 lines each
    n_new = args.new_tokens
    gen_kwargs = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)

    def one_at_a_time():
        total = 0
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            out = model.generate(**ids, **gen_kwargs)
            total += out.shape[1] - ids["input_ids"].shape[1]
        return total

    def batched():
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, **gen_kwargs)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)

    cfg = load_config(None, ["generation.temperature=0", f"generation.max_new_tokens={n_new}"], command="generate")

    def llmcli_path():
        """What `llmcli generate --temperature 0` does after loading: batch (default size), generate, format."""
        sink = io.StringIO()
        items = iter([Prompt(p) for p in prompts])
        generate._run_batches(model, tok, items, cfg.generation, generate._generate_batch, sink, "jsonl", "causal-lm")
        return sum(json.loads(x)["completion_tokens"] for x in sink.getvalue().splitlines())

    results: dict = {}
    with torch.inference_mode():
        batched()  # warm-up
        for name, fn in (("one_at_a_time", one_at_a_time), ("batched_generate", batched), ("llmcli_generate", llmcli_path)):
            start = time.perf_counter()
            tokens = fn()
            secs = time.perf_counter() - start
            results[name] = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}
        lengths = _prompt_length_cases(model, tok, Path(args.text).read_text(), gen_kwargs, args.repeats)

    base = results["one_at_a_time"]["tokens_per_s"]
    ratio = lengths["prompt_256"]["median_s"] / lengths["prompt_16"]["median_s"]
    report = {
        "benchmark": f"{args.prompts} prompts x {n_new} new tokens, greedy; {n_new} new tokens after 16- vs 256-token prompts",
        "model": about + (f" ({args.model})" if args.model else " (random weights)"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "results": results,
        "speedup_vs_one_at_a_time": {k: v["tokens_per_s"] / base for k, v in results.items()},
        "prompt_length": lengths,
        "prompt_256_over_16": ratio,
        "targets": {"batched >= 10x loop": results["batched_generate"]["tokens_per_s"] / base >= 10, "256/16 < 2x": ratio < 2},
    }
    print(about)
    print(f"{'':20} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs loop':>8}")
    for name, r in results.items():
        print(f"{name:20} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base:7.1f}x")
    print(f"\n{n_new} new tokens after a prompt of (median of {args.repeats}):")
    for name, r in lengths.items():
        print(f"  {name:18} {r['prompt_tokens']:4d} tokens  {r['median_s'] * 1000:8.1f} ms")
    print(f"256-token / 16-token prompt: {ratio:.2f}x (target < 2x)")
    out = Path(args.out) / "gru-generate.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _build_gru(path: Path, args) -> str:
    """A randomly initialised GRU of the asked shape, with a BPE of the asked size trained on the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    special = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator([Path(args.text).read_text()], trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=[special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special, unk_token=special)
    config = AutoConfig.for_model("gru", vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                  pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _prompt_length_cases(model, tok, text: str, gen_kwargs: dict, repeats: int) -> dict:
    ids = tok(text[:20000])["input_ids"]
    cases = {"prompt_16": (ids[:16], True), "prompt_256": (ids[:256], True), "prompt_256_no_cache": (ids[:256], False)}
    out = {}
    for name, (prompt, cache) in cases.items():
        x = {"input_ids": _tensor([prompt]), "attention_mask": _tensor([[1] * len(prompt)])}
        times = []
        for _ in range(repeats if cache else 1):
            start = time.perf_counter()
            model.generate(**x, use_cache=cache, **gen_kwargs)
            times.append(time.perf_counter() - start)
        out[name] = {"prompt_tokens": len(prompt), "median_s": statistics.median(times), "runs_s": times}
    return out


def _tensor(rows):
    import torch

    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------
# (b) perplexity: GRU vs GPT-2 demo vs unigram, through the real CLI


def perplexity(args) -> None:
    out = Path(args.out) / "gru-perplexity"
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--set", "training.max_steps=60", "--set", "training.eval_steps=30", "--set", "training.save_steps=1000",
             "--set", "training.warmup_steps=10"] if args.quick else []
    runs = {}
    for name, config in (("gpt2", "configs/shakespeare.yaml"), ("gru", "configs/shakespeare-gru.yaml")):
        run_dir = out / name
        start = time.perf_counter()
        _llmcli(args, "pretrain", "--config", str(ROOT / config), "-o", str(run_dir), "--no-resume", "--overwrite", "--quiet", *quick)
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[name] = {"config": config, "wall_s": time.perf_counter() - start, "train_runtime_s": summary["train_runtime_s"],
                      "train_tokens_per_s": summary["train_tokens_per_second"], "steps": summary["global_step"],
                      "validation_perplexity_blocks": summary.get("perplexity")}

    val_text, train_text = _split(ROOT / "configs/shakespeare-gru.yaml")
    val_file = out / "validation.txt"
    val_file.write_text(val_text)
    for name in runs:
        res = json.loads(_llmcli(args, "eval", "--model", str(out / name), "--data", str(val_file), "--json", "--quiet"))
        runs[name]["eval"] = {"perplexity": res["metrics"]["perplexity"], "bits_per_byte": res["metrics"]["bits_per_byte"],
                              "tokens_scored": res["metrics"]["tokens_scored"], "protocol": res["protocol"]}

    tok = _same_tokenizer(out / "gpt2", out / "gru")
    unigram = _unigram(tok, train_text, val_text)
    gru_ppl = runs["gru"]["eval"]["perplexity"]
    report = {
        "benchmark": "Tiny Shakespeare, BPE 2048 trained on the text (shared), block 128, batch 16; eval on the held-out 5%",
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores",
        "runs": runs,
        "unigram": unigram,
        "unigram_over_gru": unigram["perplexity"] / gru_ppl,
        "targets": {"gru <= unigram / 3": gru_ppl * 3 <= unigram["perplexity"]},
    }
    print(f"{'':8} {'val ppl':>9} {'eval ppl':>9} {'bits/byte':>9} {'tok/s':>8} {'train s':>8}")
    for name, r in runs.items():
        print(f"{name:8} {r['validation_perplexity_blocks'] or float('nan'):9.1f} {r['eval']['perplexity']:9.1f} "
              f"{r['eval']['bits_per_byte']:9.3f} {r['train_tokens_per_s']:8.0f} {r['train_runtime_s']:8.1f}")
    print(f"{'unigram':8} {'':9} {unigram['perplexity']:9.1f} {unigram['bits_per_byte']:9.3f}")
    print(f"unigram / GRU perplexity: {report['unigram_over_gru']:.2f}x (target >= 3x); "
          f"GRU / GPT-2 train time: {runs['gru']['train_runtime_s'] / runs['gpt2']['train_runtime_s']:.2f}")
    path = Path(args.out) / "gru-perplexity.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def _llmcli(args, *cli_args: str) -> str:
    cmd = shlex.split(args.llmcli) + list(cli_args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _split(config_path: Path) -> tuple[str, str]:
    """The held-out and training text exactly as `llmcli pretrain` splits them."""
    from llmcli.config import load_config
    from llmcli.data.sources import RawData

    cfg = load_config(config_path)
    raw = RawData(cfg.data, cfg.training.seed).splits
    return "".join(raw["validation"]["text"]), "".join(raw["train"]["text"])


def _same_tokenizer(a: Path, b: Path):
    from transformers import AutoTokenizer

    if (a / "tokenizer.json").read_text() != (b / "tokenizer.json").read_text():
        sys.exit("the two runs trained different tokenizers; perplexities would not compare")
    return AutoTokenizer.from_pretrained(str(a))


def _unigram(tok, train_text: str, val_text: str) -> dict:
    """Add-one-smoothed unigram over the vocabulary, scored like `llmcli eval`: every token after the first."""
    counts = Counter(tok(train_text)["input_ids"])
    vocab, total = len(tok), sum(counts.values())
    val = tok(val_text)["input_ids"][1:]
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in val)
    return {"perplexity": math.exp(nll / len(val)), "bits_per_byte": nll / (len(val_text.encode()) * math.log(2)),
            "tokens_scored": len(val), "train_tokens": total}


if __name__ == "__main__":
    main()
