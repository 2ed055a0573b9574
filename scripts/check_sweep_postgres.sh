#!/usr/bin/env bash
# The README's server-database path, for real (#23): two `llmcli sweep` workers share one study in a
# PostgreSQL server started here (Debian's postgresql: initdb/pg_ctl in a temporary dir, loopback
# only), one of them is killed with kill -9 in the middle of its trial, and a third run finishes the
# sweep. Checks: exactly n_trials COMPLETE trials, every grid point once, no trial run twice, no
# worker crash, the leaderboard complete. Prints a table and writes bench-out/sweep-postgres.json.
#   bash scripts/check_sweep_postgres.sh        # needs postgresql (apt) and psycopg[binary] (pip)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$PGBIN" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 2; }
python3 -c "import psycopg" 2>/dev/null || { echo "psycopg is missing (pip install 'psycopg[binary]': SQLAlchemy 2 reads postgresql:// with it)" >&2; exit 2; }
WORK=$(mktemp -d)
PORT=$(python3 -c "from llmcli.train.launch import free_port; print(free_port())")
AS=()
[ "$(id -u)" = 0 ] && AS=(runuser -u postgres --)  # the server refuses to run as root
chmod 777 "$WORK"
stop() { "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap stop EXIT
"${AS[@]}" "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >/dev/null
"${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -o "-h 127.0.0.1 -p $PORT -k $WORK" -l "$WORK/pg.log" -w start >/dev/null
"${AS[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres sweeps
URL="postgresql://postgres@127.0.0.1:$PORT/sweeps"

# a tiny GPT-2 on the bundled Tiny Shakespeare, 8 steps with a checkpoint every 2; a 4-point grid
cat > "$WORK/base.yaml" <<YAML
task: causal-lm
model: {model_type: gpt2, config_overrides: {n_layer: 2, n_embd: 64, n_head: 2, n_positions: 128}, vocab_size: 300}
data: {train_file: $ROOT/data/tinyshakespeare.txt, validation_split_percentage: 5, block_size: 32, max_train_samples: 2000}
training: {output_dir: unused, max_steps: 8, per_device_train_batch_size: 8, eval_strategy: steps, eval_steps: 4,
           save_steps: 2, logging_steps: 2, report_to: none, curves: false, seed: 0}
YAML
cat > "$WORK/sweep.yaml" <<YAML
base: $WORK/base.yaml
command: pretrain
search: {training.learning_rate: {type: categorical, choices: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}}
sampler: grid
pruner: none
baseline: false
output_dir: $WORK/sweep
YAML
export OMP_NUM_THREADS=1 LLMCLI_CACHE="$WORK/cache"
llmcli pretrain --config "$WORK/base.yaml" --set training.max_steps=1 --set training.eval_strategy=no -o "$WORK/warm" --quiet
start=$(date +%s)
llmcli sweep --config "$WORK/sweep.yaml" --storage "$URL" > "$WORK/a.out" 2> "$WORK/a.log" & A=$!
llmcli sweep --config "$WORK/sweep.yaml" --storage "$URL" > "$WORK/b.out" 2> "$WORK/b.log" & B=$!
# kill worker B once its first trial has a checkpoint (mid-trial)
for _ in $(seq 600); do
  ls "$WORK"/sweep/trial-*/checkpoint-2 >/dev/null 2>&1 && break
  sleep 0.1
done
kill -9 "$B"; wait "$B" || true
wait "$A"; A_CODE=$?
llmcli sweep --config "$WORK/sweep.yaml" --storage "$URL" > "$WORK/c.out" 2> "$WORK/c.log"; C_CODE=$?
WALL=$(( $(date +%s) - start ))
python3 - "$URL" "$WORK" "$A_CODE" "$C_CODE" "$WALL" <<'PY'
import json, sys
from pathlib import Path

import optuna

url, work, a_code, c_code, wall = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="sweep", storage=url)
trials = study.get_trials()
states = {}
for t in trials:
    states[t.state.name] = states.get(t.state.name, 0) + 1
points = sorted(t.params["training.learning_rate"] for t in trials if t.state.name == "COMPLETE")
board = [json.loads(line) for line in (work / "sweep" / "leaderboard.jsonl").read_text().splitlines()]
resumed = sum(log.read_text().count("was interrupted") for log in (work / "a.log", work / "c.log"))
checks = {
    "worker A and the rerun exit 0": a_code == 0 and c_code == 0,
    "4 trials, all COMPLETE": states == {"COMPLETE": 4},
    "every grid point once": points == [1e-3, 2e-3, 3e-3, 4e-3],
    "the killed worker's trial resumed once": resumed == 1,
    "leaderboard lists the 4 trials": sorted(r["trial"] for r in board) == [0, 1, 2, 3],
}
report = {"storage": "postgresql (local server)", "states": states, "grid_points": points, "resumed": resumed,
          "wall_s": wall, "checks": checks}
for name, ok in checks.items():
    print(f"{'ok  ' if ok else 'FAIL'}  {name}")
print(f"wall {wall} s, states {states}")
out = Path("bench-out/sweep-postgres.json")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(report, indent=2) + "\n")
sys.exit(0 if all(checks.values()) else 1)
PY
