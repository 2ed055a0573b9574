"""Build the shipped review data under data/reviews/ from Rotten Tomatoes sentence polarity v1.0.

    python scripts/build_review_data.py --rt ../shared/data/sentiment/rt-polarity

One seeded 90/10 split of the 10,662 sentences; every derived file keeps to its side of it:
- train.tsv / test.tsv: `text<TAB>label` (positive/negative): policy pretraining, sentiment classifier
- prompts_train.jsonl / prompts_test.jsonl: {"prompt"}: the first words of a sentence (RL prompts)
- pairs_train.jsonl / pairs_test.jsonl: {"prompt", "chosen", "rejected"}: a positive and a negative
  sentence that open with the same words; the prompt is those words (DPO and reward-model pairs)
"""

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

PROMPT_WORDS = 3  # RL prompts: the opening words of a review
PAIR_WORDS = 1  # preference pairs share this many opening words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rt", default="../shared/data/sentiment/rt-polarity")
    ap.add_argument("--out", default="data/reviews")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--test-prompts", type=int, default=64)
    ap.add_argument("--train-pairs", type=int, default=1500)
    a = ap.parse_args()
    rows = []
    for label, name in (("positive", "rt-polarity.pos"), ("negative", "rt-polarity.neg")):
        for line in (Path(a.rt) / name).read_text(encoding="utf-8").splitlines():
            text = " ".join(line.split())
            if text:
                assert "\t" not in text
                rows.append((text, label))
    rng = random.Random(a.seed)
    rng.shuffle(rows)
    n_test = int(len(rows) * a.test_fraction)
    splits = {"test": rows[:n_test], "train": rows[n_test:]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        (out / f"{split}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part), encoding="utf-8")
        n_prompts = a.train_prompts if split == "train" else a.test_prompts
        prompts = [" ".join(t.split()[:PROMPT_WORDS]) for t, _ in part if len(t.split()) > PROMPT_WORDS + 2][:n_prompts]
        _jsonl(out / f"prompts_{split}.jsonl", [{"prompt": p} for p in prompts])
        pairs = _pairs(part, rng)
        _jsonl(out / f"pairs_{split}.jsonl", pairs[: a.train_pairs] if split == "train" else pairs)
    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size:,} bytes, {len(f.read_text().splitlines()):,} lines")


def _pairs(rows, rng) -> list[dict]:
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"positive": [], "negative": []})
    for text, label in rows:
        words = text.split()
        if len(words) > PAIR_WORDS + 2:
            groups[" ".join(words[:PAIR_WORDS])][label].append(" " + " ".join(words[PAIR_WORDS:]))
    pairs = []
    for prefix, g in groups.items():
        for chosen, rejected in zip(g["positive"], g["negative"]):
            pairs.append({"prompt": prefix, "chosen": chosen, "rejected": rejected})
    rng.shuffle(pairs)
    return pairs


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
