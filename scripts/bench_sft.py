"""Packed prompt/completion fine-tuning against unpacked, in one run: tokens/s and eval loss.

A GPT-2 (4 layers, 256 wide, GPT-2's BPE, random init) is fine-tuned by `llmcli finetune` (the real CLI) on
data/instruct/train.jsonl (self-instruct's human-written tasks, 384 rows) for 1 epoch and evaluated on
data/instruct/test.jsonl (43 rows, never packed), max_seq_length 512, lr 1e-3, seed 0. Three runs:

- unpacked, random batches of 8 rows (llmcli's default for prompt/completion rows, and what a plain Trainer script does)
- unpacked, batches of 8 rows of similar length (`train_sampling_strategy=group_by_length`)
- packed (`data.packing=true`), batches of 2 blocks of up to 512 tokens (about the real tokens of 8 rows)

Throughput counts real tokens (each row's prompt + completion + EOS, as llmcli tokenizes them) per second of
training; padding is Trainer's count of every token fed (`include_num_input_tokens_seen: all`) less those.
With `--repeats N` the three runs are repeated N times, each round in a rotated order (so no side always runs
first or last on a machine whose speed drifts), and the table shows each side's median and each run's ratio to the
random-batch run beside it. `--seeds 0,1,2` runs each side with each training seed (model init is fixed; the seed
orders the data): the spread of eval loss across seeds is the noise the sides' losses are compared against.

    python scripts/bench_sft.py --gpt2-tokenizer ../shared/data/gpt2_bpe --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS, MAX_LEN = 1, 512


def build_model(work: Path, tokenizer_dir: Path) -> Path:
    out = work / "gpt2-4x256"
    if not (out / "model.safetensors").exists():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        torch.manual_seed(0)
        tok = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
        GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=1024, vocab_size=len(tok))).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def real_tokens(model: Path, train: Path) -> int:
    """Tokens of one epoch without padding: prompt + completion + EOS, cut at MAX_LEN (as llmcli builds rows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    p = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    c = tok([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    return sum(min(len(a) + len(b) + 1, MAX_LEN) for a, b in zip(p, c))


def run(model: Path, train: Path, test: Path, out: Path, seed: int, *extra: str) -> dict:
    sets = [f"data.train_file={train}", f"data.validation_file={test}", f"data.max_seq_length={MAX_LEN}",
            f"training.num_train_epochs={EPOCHS}", "training.learning_rate=1e-3", f"training.seed={seed}", "training.logging_steps=10",
            "training.eval_strategy=no", "training.save_strategy=no", "training.include_num_input_tokens_seen=all", *extra]
    r = benchlib.finetune(["--model", str(model), *[a for s in sets for a in ("--set", s)]], out)
    s = r["summary"]
    return {"eval_loss": s["eval_loss"], "train_runtime_s": s["train_runtime_s"], "steps": s["global_step"], "tokens_fed": r["tokens_fed"],
            "wall_s": r["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2-tokenizer", required=True, help="a GPT-2 tokenizer dir (vocab.json + merges.txt)")
    ap.add_argument("--data", default=str(ROOT / "data" / "instruct"))
    ap.add_argument("--work", default="bench-out/sft")
    ap.add_argument("--out", default="bench-out/sft.json")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three runs, each round in a rotated order")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated: each round runs every side with each")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work, Path(args.gpt2_tokenizer).resolve())
    train, test = Path(args.data).resolve() / "train.jsonl", Path(args.data).resolve() / "test.jsonl"
    real = real_tokens(model, train) * EPOCHS
    sides = {
        "unpacked, random batches": ("training.per_device_train_batch_size=8", "training.train_sampling_strategy=random"),
        "unpacked, grouped by length": ("training.per_device_train_batch_size=8", "training.train_sampling_strategy=group_by_length"),
        "packed": ("training.per_device_train_batch_size=2", "data.packing=true"),
    }
    names = list(sides)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    seeds = [int(x) for x in args.seeds.split(",")]
    for rnd in range(args.repeats):
        for seed in seeds:
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                r = run(model, train, test, work / name.replace(", ", "-").replace(" ", "-"), seed, *sides[name])
                r["seed"] = seed
                r["real_tokens_per_s"] = real / r["train_runtime_s"]
                r["padding_per_step"] = (r["tokens_fed"] - real) / r["steps"]
                runs[name].append(r)
                print(f"round {rnd + 1}, seed {seed}: {name}: {r['real_tokens_per_s']:.0f} real tokens/s, eval loss {r['eval_loss']:.4f}",
                      flush=True)
    base = runs[names[0]]
    results = {}
    for name in names:
        # each run against the random-batch run of its round and seed
        ratios = [r["real_tokens_per_s"] / b["real_tokens_per_s"] for r, b in zip(runs[name], base)]
        losses = {r["seed"]: r["eval_loss"] for r in runs[name]}  # a seed's runs train bit-identically
        results[name] = {**runs[name][0], "real_tokens_per_s": statistics.median(r["real_tokens_per_s"] for r in runs[name]),
                         "train_runtime_s": statistics.median(r["train_runtime_s"] for r in runs[name]),
                         "eval_loss": statistics.mean(losses.values()), "eval_loss_by_seed": losses,
                         "real_tokens_per_s_runs": [r["real_tokens_per_s"] for r in runs[name]],
                         "speedup_over_random": statistics.median(ratios), "speedup_runs": ratios}
    print(f"{'':30} {'eval loss (by seed)':>24} {'steps':>6} {'real tok/s':>10} {'x random':>8} {'each run':>18} {'pads/step':>10}")
    for name, r in results.items():
        by_seed = "/".join(f"{x:.3f}" for x in r["eval_loss_by_seed"].values())
        print(f"{name:30} {by_seed:>24} {r['steps']:6d} {r['real_tokens_per_s']:10.0f} {r['speedup_over_random']:8.2f} "
              f"{'/'.join(f'{x:.2f}' for x in r['speedup_runs']):>18} {r['padding_per_step']:10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "packed vs unpacked prompt/completion fine-tuning", "machine": f"{os.cpu_count()} CPU cores",
                                          "real_tokens": real, "epochs": EPOCHS, "max_seq_length": MAX_LEN, "repeats": args.repeats,
                                          "seeds": seeds, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
