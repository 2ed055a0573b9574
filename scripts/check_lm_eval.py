"""Side by side with lm-evaluation-harness: `llmcli eval --per-document --add-bos` against lm-eval's
own `HFLM.loglikelihood_rolling` and its wikitext task's word/byte counting and aggregation, on
the same local model and documents. They should agree to float32 noise (~1e-6 relative).

The model is a GPT-2 built from a config (random weights, initializer_range 0.2 so the
predictions depend on the context; n_positions = --max-length) with a byte-level BPE trained on
the text, saved to a temporary dir that both sides load. Documents: WikiText articles (split at
` = Title = ` lines) when the file has such headings, else runs of blank-line-separated paragraphs
of about --doc-chars characters; most span several windows.
lm-eval scores each document with its BOS (here <|endoftext|>) as the prefix token, which is what
llmcli's --add-bos does. The documents are scored as they are (no wikitext detokenizer) on both sides.

    python scripts/check_lm_eval.py                                   # tests/fixtures/shakespeare_small.txt
    python scripts/check_lm_eval.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --max-docs 6
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADING = re.compile(r"^ = [^=].* = $")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(HERE.parent / "tests" / "fixtures" / "shakespeare_small.txt"), help="a local text file")
    ap.add_argument("--max-docs", type=int, default=8, help="documents to score")
    ap.add_argument("--doc-chars", type=int, default=3000, help="plain text: paragraphs per document up to about this many characters")
    ap.add_argument("--max-length", type=int, default=128, help="model context = lm-eval max_length = llmcli --max-length")
    ap.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary trained on the text")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="bench-out/check_lm_eval.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    text = Path(args.text).read_text(encoding="utf-8")
    docs = split_documents(text, args.doc_chars)[: args.max_docs]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(text, model_dir, args.max_length, args.vocab_size)
        src = Path(tmp) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        start = time.perf_counter()
        ref = run_lm_eval(model_dir, docs, args.max_length, args.batch_size)
        ref["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        ours = run_llmcli(model_dir, src, args.max_length, args.batch_size)
        ours["seconds"] = time.perf_counter() - start

    rows = []
    for key in ("loglikelihood", "tokens", "words", "bytes", "bits_per_byte", "word_perplexity", "byte_perplexity"):
        a, b = ref[key], ours[key]
        rows.append({"metric": key, "lm_eval": a, "llmcli": b, "rel_diff": abs(a - b) / abs(a) if a else abs(b)})
    print(f"{len(docs)} documents from {args.text}; GPT-2 {model_summary(args.max_length)}; max_length {args.max_length}")
    print(f"{'metric':<16} {'lm-eval':>20} {'llmcli':>20} {'rel diff':>10}")
    for r in rows:
        fmt = "{:>20,}" if isinstance(r["lm_eval"], int) else "{:>20.10g}"
        print(f"{r['metric']:<16} {fmt.format(r['lm_eval'])} {fmt.format(r['llmcli'])} {r['rel_diff']:>10.2e}")
    doc_diff = max(abs(a - b) / abs(a) for a, b in zip(ref["per_doc"], ours["per_doc"]))
    print(f"per document: largest loglikelihood relative difference {doc_diff:.2e}")
    print(f"seconds: lm-eval {ref['seconds']:.1f}, llmcli (process start included) {ours['seconds']:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"text": args.text, "documents": len(docs), "max_length": args.max_length, "vocab_size": args.vocab_size,
              "rows": rows, "per_document_max_rel_diff": doc_diff, "lm_eval_per_document": ref["per_doc"],
              "llmcli_per_document": ours["per_doc"], "lm_eval_version": lm_eval_version(),
              "llmcli_protocol": ours["protocol"], "seconds": {"lm_eval": ref["seconds"], "llmcli": ours["seconds"]}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def split_documents(text: str, doc_chars: int) -> list[str]:
    """WikiText articles (a ` = Title = ` line starts one) when there are headings, else runs of
    blank-line-separated paragraphs (joined by a blank line) of about `doc_chars` characters."""
    lines = text.splitlines(keepends=True)
    if any(HEADING.match(line.rstrip("\n")) for line in lines):
        docs: list[list[str]] = []
        for line in lines:
            if HEADING.match(line.rstrip("\n")) or not docs:
                docs.append([])
            docs[-1].append(line)
        return ["".join(d) for d in docs if "".join(d).strip()]
    docs, current = [], []
    for paragraph in (p for p in re.split(r"\n\s*\n", text) if p.strip()):
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    return docs + (["\n\n".join(current)] if current else [])


def model_summary(max_length: int) -> str:
    return f"4 layers x 128, n_positions {max_length}, random (initializer_range 0.2)"


def build_model(text: str, out: Path, max_length: int, vocab_size: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_positions=max_length, n_embd=128, n_layer=4, n_head=4, initializer_range=0.2,
                        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    fast.save_pretrained(out)


def run_lm_eval(model_dir: Path, docs: list[str], max_length: int, batch_size: int) -> dict:
    """lm-eval's path for a loglikelihood_rolling task (what `--tasks wikitext` runs per document):
    HFLM.loglikelihood_rolling, then the wikitext task's process_results and its aggregations."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, max_length=max_length, dtype="float32")
    requests = [Instance(request_type="loglikelihood_rolling", doc={"page": d}, arguments=(d,), idx=0) for d in docs]
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    per = [process_results({"page": d}, [ll]) for d, ll in zip(docs, lls)]
    words = [p["word_perplexity"] for p in per]
    byts = [p["bits_per_byte"] for p in per]
    total = sum(lls)
    return {
        "loglikelihood": total, "tokens": sum(len(lm.tok_encode(d)) for d in docs),
        "words": sum(w for _, w in words), "bytes": sum(b for _, b in byts),
        "bits_per_byte": bits_per_byte(byts), "word_perplexity": weighted_perplexity(words),
        "byte_perplexity": weighted_perplexity([p["byte_perplexity"] for p in per]), "per_doc": lls,
    }


def run_llmcli(model_dir: Path, src: Path, max_length: int, batch_size: int) -> dict:
    """The real CLI, in a subprocess, as a user runs it."""
    cmd = [sys.executable, "-m", "llmcli", "eval", "--model", str(model_dir), "--data", str(src), "--per-document", "--add-bos",
           "--max-length", str(max_length), "--batch-size", str(batch_size), "--device", "cpu", "--dtype", "float32", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if proc.returncode != 0:
        sys.exit(f"llmcli eval failed ({proc.returncode}): {proc.stderr.strip()}")
    got = json.loads(proc.stdout)
    m = got["metrics"]
    total = -m["nll"] * m["tokens_scored"]
    per_doc = per_document_llmcli(model_dir, src, max_length, batch_size)
    return {
        "loglikelihood": total, "tokens": m["tokens_scored"], "words": m["words"], "bytes": m["bytes"],
        "bits_per_byte": m["bits_per_byte"], "word_perplexity": m["word_perplexity"], "byte_perplexity": m["byte_perplexity"],
        "protocol": got["protocol"], "per_doc": per_doc,
    }


def per_document_llmcli(model_dir: Path, src: Path, max_length: int, batch_size: int) -> list[float]:
    """Each document's loglikelihood from llmcli's own `eval` path, in-process (one CLI process per
    document would mostly measure process starts): a one-line JSONL file per document."""
    import contextlib
    import io

    sys.path.insert(0, str(HERE.parent))
    from llmcli import console
    from llmcli.evaluate import evaluate
    from llmcli.config import load_config

    console.configure(quiet=True)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
            one = Path(tmp) / f"doc{i}.jsonl"
            one.write_text(line + "\n", encoding="utf-8")
            cfg = load_config(None, [f"model.model_name_or_path={model_dir}", f"data.validation_file={one}", "eval.per_document=true",
                                     "eval.add_bos=true", f"eval.max_length={max_length}", f"eval.batch_size={batch_size}"],
                              command="eval")
            with contextlib.redirect_stdout(io.StringIO()):
                m = evaluate.run(cfg, as_json=True, device="cpu", dtype="float32")["metrics"]
            out.append(-m["nll"] * m["tokens_scored"])
    return out


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
