"""What the benchmark scripts share: running `llmcli finetune` and reading what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def finetune(args: list[str], out: Path) -> dict:
    """`llmcli finetune ARGS -o OUT --no-resume --overwrite --quiet`, trained anew each time (with resume on, a dir
    holding the same finished run is left as it is, and its old summary would be read back). Returns its summary.json,
    the tokens Trainer fed (the last `num_input_tokens_seen` in metrics.jsonl, padding included with
    `include_num_input_tokens_seen: all`) and the wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmcli", "finetune", *args, "-o", str(out), "--no-resume", "--overwrite", "--quiet"],
                   check=True)
    wall = time.perf_counter() - start
    seen = [r["num_input_tokens_seen"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "num_input_tokens_seen" in r]
    return {"summary": json.loads((out / "summary.json").read_text()), "tokens_fed": seen[-1] if seen else None, "wall_s": wall}
