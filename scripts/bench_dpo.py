"""DPO and reward-model numbers (BENCHMARKS.md), and llmcli's overhead over TRL's DPOTrainer.

    python scripts/bench_dpo.py quality      # configs/dpo.yaml + configs/reward-reviews.yaml: held-out accuracy
    python scripts/bench_dpo.py overhead     # llmcli DPO vs DPOTrainer called directly, alternating

quality: trains both configs (runs/dpo, runs/reward-reviews) unless they are finished, then reads
their metrics.jsonl: DPO's held-out reward accuracy (eval_rewards/accuracies on the 255 pairs of
data/reviews/pairs_test.jsonl) at the start and at the end, and the reward model's preference
accuracy there, checked again with `llmcli eval --data data/reviews/pairs_test.jsonl`.

overhead: the same DPO run (configs/dpo.yaml settings, no evaluation, no checkpoints, --steps
steps) through `llmcli finetune` and through a plain script that builds DPOConfig + DPOTrainer
itself, each in a fresh process with 1 torch thread, alternating --rounds times; compares
Trainer's own train_runtime per step (startup and model loading excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args[:4]))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def quality(a) -> dict:
    out = {}
    for config in ("configs/dpo.yaml", "configs/reward-reviews.yaml"):
        cfg = yaml.safe_load((ROOT / config).read_text())
        run_dir = ROOT / cfg["training"]["output_dir"]
        run(["-m", "llmcli", "finetune", "--config", config])  # a finished run returns at once
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        key = "eval_rewards/accuracies" if cfg["task"] == "dpo" else "eval_accuracy"
        evals = [(r["step"], r[key]) for r in records if key in r]
        entry = {"eval_steps": evals, "start": evals[0][1], "end": evals[-1][1], "train_runtime_s": summary["train_runtime_s"],
                 "global_step": summary["global_step"]}
        if cfg["task"] == "dpo":
            margins = [(r["step"], r["eval_rewards/margins"]) for r in records if "eval_rewards/margins" in r]
            entry["margins"] = margins
        else:
            result = json.loads(run(["-m", "llmcli", "eval", "--model", run_dir, "--data", cfg["data"]["validation_file"], "--json"]))
            entry["llmcli_eval"] = result["metrics"]
        out[cfg["task"]] = entry
    return out


DIRECT = r'''
import json, sys
import yaml
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer

cfg, steps, out = yaml.safe_load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
t = cfg["training"]
set_seed(t["seed"])
tok = AutoTokenizer.from_pretrained(cfg["model"]["model_name_or_path"])
tok.pad_token = tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_pretrained(cfg["model"]["model_name_or_path"])
train = load_dataset("json", data_files=cfg["data"]["train_file"], split="train")
args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=t["per_device_train_batch_size"],
                 learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler_type"], warmup_steps=t["warmup_steps"],
                 beta=t["beta"], max_length=t["max_length"], logging_steps=t["logging_steps"], seed=t["seed"],
                 save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
                 gradient_checkpointing=False)
result = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok).train()
print(json.dumps({"train_runtime": result.metrics["train_runtime"]}))
'''


def overhead(a) -> dict:
    cfg_path = ROOT / "configs/dpo.yaml"
    times = {"llmcli": [], "trl": []}
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "direct_dpo.py"
        script.write_text(DIRECT)
        for i in range(a.rounds):
            order = ("llmcli", "trl") if i % 2 == 0 else ("trl", "llmcli")
            for name in order:
                out = Path(d) / f"{name}-{i}"
                if name == "llmcli":
                    run(["-m", "llmcli", "finetune", "--config", cfg_path, "-o", out, "-q",
                         "--set", f"training.max_steps={a.steps}", "--set", "training.eval_strategy=no",
                         "--set", "training.eval_on_start=false", "--set", "training.save_strategy=no",
                         "--set", "data.validation_file=null", "--set", "data.validation_split_percentage=0"])
                    runtime = json.loads((out / "summary.json").read_text())["train_runtime_s"]
                else:
                    runtime = json.loads(run([script, cfg_path, a.steps, out]).splitlines()[-1])["train_runtime"]
                times[name].append(runtime / a.steps)
                print(f"round {i} {name}: {runtime / a.steps:.4f} s/step", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": a.steps, "rounds": a.rounds, "s_per_step": times, "median_s_per_step": med,
            "llmcli_over_trl": med["llmcli"] / med["trl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("quality", "overhead"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = quality(a) if a.what == "quality" else overhead(a)
    text = json.dumps(result, indent=2)
    print(text)
    out = ROOT / (a.out or f"bench-out/{a.what}-dpo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
