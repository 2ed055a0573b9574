"""Memory of `data.streaming: true` vs the tokenize-and-cache path at two corpus sizes.

Builds corpora of N x WikiText-2 valid (1.1 MB each), pretrains a tiny GPT-2 for a few steps on
each with the GPT-2 tokenizer, and reports the process's peak RSS. Streaming should stay flat as
the corpus grows; the cached path pays for tokenizing everything up front. Writes JSON.

    python scripts/bench_streaming.py --sizes 2 16
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
sys.path.insert(0, str(HERE))
from bench_pretrain import LLMCLI, SHARED  # noqa: E402  (the peak-RSS wrapper around the real CLI)


def run(corpus: Path, streaming: bool, bpe: str, tmp: Path) -> dict:
    out = tmp / f"run-{corpus.stem}-{streaming}"
    args = ["pretrain", "-o", str(out), "--quiet", "--overwrite", "--set", "task=causal-lm", "--set", f"data.train_file={corpus}",
            "--set", f"model.tokenizer_name={bpe}", "--set", "model.config_overrides.n_layer=2", "--set", "model.config_overrides.n_embd=64",
            "--set", "model.config_overrides.n_head=2", "--set", "data.block_size=128", "--set", "training.max_steps=20",
            "--set", "training.per_device_train_batch_size=8", "--set", "training.save_strategy=no",
            "--set", "data.validation_split_percentage=0", "--set", f"data.streaming={str(streaming).lower()}"]
    env = {**os.environ, "LLMCLI_CACHE": str(tmp / "cache")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LLMCLI, json.dumps(args)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return {"peak_rss_mb": json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_mb"], "wall_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.valid.raw"))
    ap.add_argument("--bpe", default=str(SHARED / "gpt2_bpe"))
    ap.add_argument("--sizes", type=int, nargs=2, default=[2, 16], help="corpus sizes, in copies of --text")
    ap.add_argument("--out", default="bench-out/streaming.json")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            corpus = tmp / f"corpus{n}.txt"
            corpus.write_text(text * n, encoding="utf-8")
            mb = corpus.stat().st_size / 2**20
            for streaming in (True, False):
                rows.append({"corpus_mb": round(mb, 1), "streaming": streaming, **run(corpus, streaming, args.bpe, tmp)})
    print(f"{'corpus MB':>10} {'mode':>10} {'peak RSS MB':>12} {'wall s':>8}")
    for r in rows:
        print(f"{r['corpus_mb']:10.1f} {'streaming' if r['streaming'] else 'cached':>10} {r['peak_rss_mb']:12.0f} {r['wall_s']:8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "peak RSS vs corpus size", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
