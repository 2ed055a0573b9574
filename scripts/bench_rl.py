"""The RL demo's numbers (BENCHMARKS.md): the review policy before and after RL against the sentiment classifier.

    python scripts/bench_rl.py --train              # train (timed), then measure
    python scripts/bench_rl.py                      # measure an existing runs/rl-positive-reviews
    python scripts/bench_rl.py --policy gru         # the brief's GRU: configs/rl-gru-positive-reviews.yaml

--policy picks the config: gpt2 (configs/rl-positive-reviews.yaml, the default) or gru
(configs/rl-gru-positive-reviews.yaml); --config names any other.

Everything goes through the CLI, as a user would run it:
1. `llmcli finetune --config configs/rl-positive-reviews.yaml` (with --train): training time from summary.json;
2. `llmcli generate` samples --samples completions for each of the 64 held-out prompts
   (data/reviews/prompts_test.jsonl) from the starting policy and from the RL run, with the run's
   sampling settings and one seed (generate has no min_new_tokens: completions may end earlier than in training);
3. `llmcli generate --model runs/reviews-sentiment --format jsonl` scores prompt + completion: the
   reward is P(positive), as in training; the classifier's base rate is its mean P(positive) on the
   held-out review sentences (data/reviews/test.tsv);
4. `llmcli eval --model runs/reviews-gpt2 --per-document` gives the starting model's (the reference's)
   perplexity of the samples, next to its perplexity of real held-out reviews: do the samples stay text?
5. KL: GRPO's logged estimate (metrics.jsonl `kl`) over training, and summary.json's kl_after.
Prints a JSON report (also written to --out) and 5 samples before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def llmcli(*args: str, stdin: str | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "llmcli", *map(str, args)], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"llmcli {' '.join(map(str, args[:3]))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def sample(model: str, prompts: Path, g: dict, n: int, seed: int) -> list[dict]:
    out = llmcli("generate", "--model", model, "--input", prompts, "--input-format", "jsonl", "--format", "jsonl",
                 "--max-new-tokens", g["max_new_tokens"], "--temperature", g["temperature"], "--top-k", g.get("top_k") or 0,
                 "-n", n, "--seed", seed)
    rows = []
    for line in out.splitlines():
        rec = json.loads(line)
        comps = rec["completion"] if isinstance(rec["completion"], list) else [rec["completion"]]
        counts = rec["completion_tokens"] if isinstance(rec["completion_tokens"], list) else [rec["completion_tokens"]]
        rows += [{"prompt": rec["prompt"], "completion": c, "completion_tokens": k} for c, k in zip(comps, counts)]
    return rows


def p_positive(classifier: str, texts: list[str], tmp: Path) -> list[float]:
    f = tmp / "texts.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = llmcli("generate", "--model", classifier, "--input", f, "--input-format", "jsonl", "--format", "jsonl")
    return [json.loads(line)["scores"]["positive"] for line in out.splitlines()]


def ref_perplexity(reference: str, texts: list[str], tmp: Path) -> float:
    f = tmp / "ppl.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return json.loads(llmcli("eval", "--model", reference, "--data", f, "--per-document", "--json"))["metrics"]["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", choices=("gpt2", "gru"), default="gpt2", help="which shipped demo to measure")
    ap.add_argument("--config", help="an rl config (default: the --policy demo's)")
    ap.add_argument("--train", action="store_true", help="run the training first (timed)")
    ap.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", help="default: bench-out/rl-<policy>.json")
    a = ap.parse_args()
    a.config = a.config or {"gpt2": "configs/rl-positive-reviews.yaml", "gru": "configs/rl-gru-positive-reviews.yaml"}[a.policy]
    a.out = a.out or f"bench-out/rl-{a.policy}.json"
    cfg = yaml.safe_load((ROOT / a.config).read_text())
    run = ROOT / cfg["training"]["output_dir"]
    start = cfg["model"]["model_name_or_path"]
    classifier = cfg["reward"]["model"]
    prompts = ROOT / cfg["data"]["validation_file"]
    report: dict = {"config": a.config, "samples_per_prompt": a.samples}
    if a.train:
        t0 = time.time()
        llmcli("finetune", "--config", a.config)
        report["wall_s"] = round(time.time() - t0, 1)
    summary = json.loads((run / "summary.json").read_text())
    report["train_runtime_s"] = summary["train_runtime_s"]
    report["global_step"] = summary["global_step"]
    report["summary"] = {k: v for k, v in summary.items() if k.endswith(("_before", "_after"))}

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        real = [line.split("\t")[0] for line in (ROOT / "data/reviews/test.tsv").read_text().splitlines()[1:]]
        report["classifier_base_rate"] = statistics.mean(p_positive(classifier, real, tmp))
        report["reference_perplexity_of_real_reviews"] = ref_perplexity(start, real, tmp)
        shown = {}
        for name, model in (("before", start), ("after", str(run))):
            rows = sample(model, prompts, cfg.get("generation", {}), a.samples, a.seed)
            texts = [r["prompt"] + r["completion"] for r in rows]
            rewards = p_positive(classifier, texts, tmp)
            report[name] = {
                "mean_reward": statistics.mean(rewards),
                "share_above_0.5": sum(r > 0.5 for r in rewards) / len(rewards),
                "completions": len(rows),
                "mean_completion_tokens": statistics.mean(r["completion_tokens"] for r in rows),
                "reference_perplexity": ref_perplexity(start, texts, tmp),
            }
            shown[name] = [f"{r['prompt']}|{r['completion']}  ({w:.2f})" for r, w in zip(rows[:: a.samples][:5], rewards[:: a.samples][:5])]
    kls = [r["kl"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kl" in r and "loss" in r]
    if kls:
        report["kl_logged"] = {"first": kls[0], "max": max(kls), "last": kls[-1]}
    Path(ROOT / a.out).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    for name, lines in shown.items():
        print(f"\n{name} (prompt|completion  (P(positive))):")
        print("\n".join("  " + s for s in lines))


if __name__ == "__main__":
    main()
