"""Build the shipped instruction data under data/instruct/ from self-instruct's human-written tasks.

    python scripts/build_instruct_data.py --src <dir with seed_tasks.jsonl and user_oriented_instructions.jsonl>

Source: github.com/yizhongw/self-instruct (Apache-2.0): `data/seed_tasks.jsonl` (175 tasks) and
`human_eval/user_oriented_instructions.jsonl` (252 tasks). Each instance of a task becomes one
prompt/completion row:

    prompt:     "Instruction: <instruction>\\n[Input: <input>\\n]Response:"
    completion: " <output>"

One seeded 90/10 split by task (a task's instances stay on one side): train.jsonl / test.jsonl.
"""

import argparse
import json
import random
from pathlib import Path

FILES = ("seed_tasks.jsonl", "user_oriented_instructions.jsonl")


def rows_of(task: dict) -> list[dict]:
    out = []
    for inst in task["instances"]:
        given = inst.get("input", "").strip()
        prompt = f"Instruction: {task['instruction'].strip()}\n" + (f"Input: {given}\n" if given else "") + "Response:"
        out.append({"prompt": prompt, "completion": " " + inst["output"].strip()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", default="data/instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    args = ap.parse_args()
    tasks = [json.loads(line) for name in FILES for line in (Path(args.src) / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(args.seed).shuffle(tasks)
    n_test = round(len(tasks) * args.test_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test.jsonl", tasks[:n_test]), ("train.jsonl", tasks[n_test:])):
        rows = [row for task in part for row in rows_of(task) if row["completion"].strip()]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} rows from {len(part)} tasks")


if __name__ == "__main__":
    main()
