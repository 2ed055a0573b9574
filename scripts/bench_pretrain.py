"""Pretraining benchmark: `llmcli pretrain` vs a plain run_clm.py-style Trainer script, in one run.

Same GPT-2 shape, same GPT-2 BPE tokenizer, same data (WikiText-2 raw), same block size, global
batch and step count; each side runs --repeats times in alternating order and its fastest run counts. Reports tokens/s for each and the ratio, peak RSS, and model-FLOPs
utilisation against a matmul peak measured on the same machine (nanoGPT's estimate: 6N + 12·L·H·Q·T
FLOPs per token for a training step). Prints a table and writes JSON.

    python scripts/bench_pretrain.py                       # CPU-sized defaults
    python scripts/bench_pretrain.py --layers 12 --width 768 --block 1024 --batch 16 --steps 50 \
        --set training.bf16=true --set training.torch_compile=true   # GPT-2 124M on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"

PLAIN = r'''
import json, resource, sys, time, itertools
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed
a = json.loads(sys.argv[1])
set_seed(42)
tok = AutoTokenizer.from_pretrained(a["bpe"])
raw = load_dataset("text", data_files={"train": a["data"]}, keep_linebreaks=True)["train"]
raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
tokd = raw.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
bs = a["block"]
def group(b):
    ids = list(itertools.chain.from_iterable(b["input_ids"])); n = len(ids) // bs * bs
    blocks = [ids[i:i + bs] for i in range(0, n, bs)]
    return {"input_ids": blocks, "labels": [list(x) for x in blocks]}
ds = tokd.map(group, batched=True, remove_columns=tokd.column_names)
cfg = AutoConfig.for_model("gpt2", n_layer=a["layers"], n_head=a["heads"], n_embd=a["width"], n_positions=bs, vocab_size=len(tok))
model = AutoModelForCausalLM.from_config(cfg)
extra = a.get("extra", {})
args = TrainingArguments(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"], learning_rate=6e-4,
                         logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=42, **extra)
r = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator).train()
print(json.dumps({"train_runtime": r.metrics["train_runtime"], "params": sum(p.numel() for p in model.parameters()),
                  "vocab": cfg.vocab_size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

LLMCLI = r'''
import json, resource, runpy, sys
sys.argv = ["llmcli"] + json.loads(sys.argv[1])
try:
    runpy.run_module("llmcli", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
finally:
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
'''


def matmul_peak(device: str) -> float:
    """FLOP/s of a large square matmul in the training dtype: the machine's practical peak."""
    import torch

    n = 4096 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        x @ y
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 50 if device == "cuda" else 10
    start = time.perf_counter()
    for _ in range(reps):
        x @ y
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(params: int, layers: int, width: int, block: int) -> float:
    return 6 * params + 12 * layers * width * block


def _run_plain(args, extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        plain_args = dict(bpe=args.bpe, data=args.data, block=args.block, layers=args.layers, heads=args.heads, width=args.width,
                          steps=args.steps, batch=args.batch, out=str(Path(tmp) / "plain"), extra=extra)
        p = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(plain_args)], env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])


def _run_llmcli(args) -> dict:
    """train_runtime, params, vocab rows and peak RSS MB of one `llmcli pretrain` (as the plain script reports)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLMCLI_CACHE": str(Path(tmp) / "cache"), "TRANSFORMERS_VERBOSITY": "error"}
        out = Path(tmp) / "llmcli"
        cli_args = ["pretrain", "-o", str(out), "--quiet", "--set", "task=causal-lm", "--set", f"data.train_file={args.data}",
                    "--set", f"model.tokenizer_name={args.bpe}", "--set", f"model.config_overrides.n_layer={args.layers}",
                    "--set", f"model.config_overrides.n_head={args.heads}", "--set", f"model.config_overrides.n_embd={args.width}",
                    "--set", f"model.config_overrides.n_positions={args.block}", "--set", f"data.block_size={args.block}",
                    "--set", f"training.max_steps={args.steps}", "--set", f"training.per_device_train_batch_size={args.batch}",
                    "--set", "training.learning_rate=6e-4", "--set", "training.logging_steps=10", "--set", "training.save_strategy=no",
                    "--set", "data.validation_split_percentage=0", "--set", "training.seed=42"]
        for item in args.set:
            cli_args += ["--set", item]
        c = subprocess.run([sys.executable, "-c", LLMCLI, json.dumps(cli_args)], env=env, capture_output=True, text=True)
        if c.returncode:
            sys.exit(c.stderr[-3000:])
        summary = json.loads((out / "summary.json").read_text())
        params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(out).parameters())
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        rss = json.loads(c.stderr.strip().splitlines()[-1])["peak_rss_mb"]
        return {"train_runtime": summary["train_runtime_s"], "params": params, "vocab": vocab, "peak_rss_mb": rss}


def _fastest(runs: list[dict]) -> dict:
    """The run with the shortest training time: the least disturbed by whatever else the machine did."""
    return min(runs, key=lambda r: r["train_runtime"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--bpe", default=str(SHARED / "gpt2_bpe"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], help="extra llmcli --set (and TrainingArguments for the plain script)")
    ap.add_argument("--repeats", type=int, default=2, help="run each side this many times, alternating order; report each side's fastest run (as timeit does)")
    ap.add_argument("--out", default="bench-out/pretrain.json")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key.startswith("training."):
            import yaml

            extra[key.split(".", 1)[1]] = yaml.safe_load(value)
    plain_runs, llmcli_runs = [], []
    for rep in range(args.repeats):
        order = ("plain", "llmcli") if rep % 2 == 0 else ("llmcli", "plain")
        for side in order:
            if side == "plain":
                plain_runs.append(_run_plain(args, extra))
            else:
                llmcli_runs.append(_run_llmcli(args))
    fastest = {"plain_trainer": _fastest(plain_runs), "llmcli": _fastest(llmcli_runs)}

    tokens = args.steps * args.batch * args.block
    peak = matmul_peak(device)
    rows = {name: {"tokens_per_s": tokens / r["train_runtime"], "train_runtime_s": r["train_runtime"], "params": r["params"],
                   "vocab": r["vocab"], "peak_rss_mb": r["peak_rss_mb"]} for name, r in fastest.items()}
    for r in rows.values():
        r["mfu"] = r["tokens_per_s"] * flops_per_token(r["params"], args.layers, args.width, args.block) / peak
    report = {
        "benchmark": f"GPT-2 {args.layers}x{args.width}, block {args.block}, batch {args.batch}, {args.steps} steps on {Path(args.data).name}",
        "machine": f"{device}: " + (torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"),
        "matmul_peak_flops": peak, "extra_settings": args.set, "results": rows, "repeats": args.repeats,
        "all_runtimes_s": {"plain_trainer": [r["train_runtime"] for r in plain_runs], "llmcli": [r["train_runtime"] for r in llmcli_runs]},
        "ratio_llmcli_over_plain": rows["llmcli"]["tokens_per_s"] / rows["plain_trainer"]["tokens_per_s"],
    }
    print(f"{report['benchmark']} | {report['machine']} | matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':14} {'tokens/s':>10} {'runtime s':>10} {'params':>10} {'vocab':>7} {'peak RSS MB':>12} {'MFU':>6}")
    for name, r in rows.items():
        print(f"{name:14} {r['tokens_per_s']:10.0f} {r['train_runtime_s']:10.1f} {r['params']:10,d} {r['vocab']:7d} {r['peak_rss_mb']:12.0f} {r['mfu']:6.1%}")
    print(f"ratio llmcli / plain: {report['ratio_llmcli_over_plain']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
