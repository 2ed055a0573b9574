"""Generation benchmark: `llmcli generate`'s batching vs a one-prompt-at-a-time `model.generate`
loop and a single hand-written batched `model.generate` call, in one run, on one loaded model.

Model: a 6-layer, 384-wide GPT-2 with GPT-2's 50,257-token BPE vocabulary (randomly initialised:
speed does not depend on the weights). 64 prompts (Tiny Shakespeare lines of varied length),
32 new tokens each, greedy. Prints a table and writes JSON.

    python scripts/bench_generate.py --bpe ../shared/data/gpt2_bpe --text data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", default=str(HERE.parent.parent / "shared" / "data" / "gpt2_bpe"), help="dir with GPT-2 vocab.json/merges.txt")
    ap.add_argument("--text", default=str(HERE.parent / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench-out/generate.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from llmcli.generate import generate
    from llmcli.config import load_config
    from llmcli.generate.prompts import read_prompts

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.bpe)
    tok.pad_token = tok.eos_token
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=6, n_embd=384, vocab_size=len(tok), n_positions=512)).eval()
    lines = [x for x in Path(args.text).read_text().splitlines() if x.strip()]
    prompts = [" ".join(lines[i * 7 : i * 7 + 1 + i % 4]) for i in range(args.prompts)]  # 1 to 4 lines each
    n_new = args.new_tokens
    gen_kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)

    def timed(fn):
        start = time.perf_counter()
        tokens = fn()
        return tokens, time.perf_counter() - start

    def one_at_a_time():
        total = 0
        with torch.inference_mode():
            for p in prompts:
                ids = tok(p, return_tensors="pt")
                out = model.generate(**ids, **gen_kwargs)
                total += out.shape[1] - ids["input_ids"].shape[1]
        return total

    def hand_batched():
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, **gen_kwargs)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        src.write_text("\n".join(generate._escape(p) for p in prompts) + "\n")
        cfg = load_config(None, ["generation.temperature=0", f"generation.max_new_tokens={n_new}"])

        def llmcli_path():
            """What `llmcli generate --input prompts.txt --temperature 0` does after loading the model:
            read and parse the file, batch (default batch size), generate, format and write."""
            sink = io.StringIO()
            items = read_prompts(None, str(src), "text")
            generate._run_batches(model, tok, items, cfg.generation, generate._generate_batch, sink, "jsonl", "causal-lm")
            return sum(json.loads(x)["completion_tokens"] for x in sink.getvalue().splitlines())

        hand_batched()  # warm-up
        results = {}
        for name, fn in (("one_at_a_time", one_at_a_time), ("hand_batched_generate", hand_batched), ("llmcli_generate", llmcli_path)):
            tokens, secs = timed(fn)
            results[name] = {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}

        # The whole command, for reference: process start, imports and model load included.
        model_dir = Path(tmp) / "model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmcli", "generate", "--model", str(model_dir), "--input", str(src), "--temperature", "0",
                        "--max-new-tokens", str(n_new), "--quiet"], check=True, capture_output=True)
        results["llmcli_command_wall_s"] = time.perf_counter() - start

    base = results["one_at_a_time"]["tokens_per_s"]
    report = {
        "benchmark": f"{args.prompts} prompts x {n_new} new tokens, greedy, GPT-2 6x384 (vocab {len(tok)})",
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "results": results,
        "speedup_vs_one_at_a_time": {k: v["tokens_per_s"] / base for k, v in results.items() if isinstance(v, dict)},
        "llmcli_over_hand_batched": results["llmcli_generate"]["tokens_per_s"] / results["hand_batched_generate"]["tokens_per_s"],
    }
    print(f"{'':24} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs loop':>8}")
    for name in ("one_at_a_time", "hand_batched_generate", "llmcli_generate"):
        r = results[name]
        print(f"{name:24} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base:7.1f}x")
    print(f"llmcli / hand-batched: {report['llmcli_over_hand_batched']:.3f}")
    print(f"whole `llmcli generate` command (start, imports, load, generate): {results['llmcli_command_wall_s']:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
