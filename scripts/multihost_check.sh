#!/usr/bin/env bash
# A real two-process training job on one machine, checked against a one-process run.
#
#   bash scripts/multihost_check.sh [OUT_DIR]      (default OUT_DIR: runs/multihost_check; ~10 min on 2 CPU cores)
#
# Both processes run `train.py --multihost` on a tiny UR-Net (synthetic data, CPU), one CPU device each,
# joined by `jax.distributed.initialize()` with a local coordinator (127.0.0.1) and gloo CPU collectives.
# They get the environment `srun` gives the tasks of a SLURM job step (SLURM_JOB_ID, SLURM_NTASKS,
# SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST), from which JAX's cluster detection reads the process
# count and id; JAX_COORDINATOR_ADDRESS overrides the coordinator's host and port. Checks:
#   1. the two-process run's metrics (every epoch's losses and accuracies) equal those of one process
#      holding two CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2), same global batch,
#      to float32 summation-order differences;
#   2. process 1 writes at most its own shards of the checkpoints (ocdbt.process_1/, array_metadatas/
#      process_1; none while the state is replicated, as process 0 writes it whole): no config, metrics,
#      TensorBoard events or checkpoint metadata (it runs with umask 027, so every file it creates is
#      recognisable by its mode);
#   3. kill -9 of process 1 after a phase-2 checkpoint, then of process 0 (as a cluster manager ends a
#      job whose task died), and a restart of both: the run resumes from the last checkpoint and ends with
#      exactly the metrics of the uninterrupted two-process run.
# Exit status 0 when every check passes; the first failed check is printed on stderr.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO_ROOT/runs/multihost_check}")"
PYTHON="${PYTHON:-python}"
KILL_AFTER_STEP=12  # the first periodic checkpoint at or after this global step (phase 2) triggers the kill
CONFIG=(--config "$REPO_ROOT/configs/demo.py" --noprogress
        --config.model.enhancer_width=4 --config.model.classifier_width=4
        --config.data.synthetic_per_class=16 --config.data.train_size=64 --config.data.prepared_dir="$OUT/data"
        --config.pretrain.epochs=1 --config.train.epochs=2 --config.batch_size=8 --config.eval_batch_size=8
        --config.optimizer.name=sgd --config.optimizer.lr=0.02 --config.checkpoint.every_steps=3)
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo

fail() { echo "multihost_check: FAILED: $*" >&2; exit 1; }

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_process WORKDIR ID PORT: one task of a two-task job step, in the background (pid in PIDS[ID]).
declare -a PIDS
start_process() {
  local workdir=$1 id=$2 port=$3
  ( umask $([ "$id" = 0 ] && echo 022 || echo 027)
    exec env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" SLURM_JOB_ID=1 SLURM_STEP_NODELIST=127.0.0.1 \
      SLURM_NTASKS=2 SLURM_PROCID="$id" SLURM_LOCALID="$id" \
      "$PYTHON" "$REPO_ROOT/train.py" "${CONFIG[@]}" --workdir "$workdir" --multihost ) \
    >>"$workdir.process$id.log" 2>&1 &
  PIDS[$id]=$!
}

two_processes() {  # two_processes WORKDIR: runs the job to its end; fails unless both tasks succeed
  local port; port=$(free_port)
  start_process "$1" 0 "$port"; start_process "$1" 1 "$port"
  wait "${PIDS[0]}" || fail "process 0 of $1 failed (see $1.process0.log)"
  wait "${PIDS[1]}" || fail "process 1 of $1 failed (see $1.process1.log)"
}

rm -rf "$OUT"; mkdir -p "$OUT"
cd "$REPO_ROOT"

echo "1/3 one process, two CPU devices"
XLA_FLAGS="--xla_force_host_platform_device_count=2" "$PYTHON" train.py "${CONFIG[@]}" --workdir "$OUT/one" \
  >"$OUT/one.log" 2>&1 || fail "the one-process run failed (see $OUT/one.log)"

echo "2/3 two processes"
two_processes "$OUT/two"
"$PYTHON" - "$OUT/one/metrics.jsonl" "$OUT/two/metrics.jsonl" <<'EOF' || fail "two-process metrics differ from one process"
import json, math, sys
from urnet_jax.workdir import TIMING_KEYS
one, two = ([json.loads(line) for line in open(path)] for path in sys.argv[1:])
assert len(one) == len(two) == 3, (len(one), len(two))
for a, b in zip(one, two):
    assert (a["phase"], a["epoch"], a["step"]) == (b["phase"], b["epoch"], b["step"]), (a, b)
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for key in a.keys() - TIMING_KEYS:  # losses, accuracies, PSNR, ... of every split
        if isinstance(a[key], float) or isinstance(b[key], float):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a, b)
        else:
            assert a[key] == b[key], (key, a, b)
print("   metrics of one and two processes agree:", [round(row["test_loss"], 6) for row in two])
EOF
grep -q "^training " "$OUT/two.process1.log" && fail "process 1 printed the run's log lines"
"$PYTHON" - "$OUT/two" <<'EOF' || fail "process 1 wrote more than its own checkpoint shards"
import pathlib, re, stat, sys
workdir = pathlib.Path(sys.argv[1])
by_process_1 = [p.relative_to(workdir) for p in workdir.rglob("*")
                if p.is_file() and not p.stat().st_mode & stat.S_IROTH]  # umask 027: not world-readable
own_shards = re.compile(r"(^|/)(ocdbt\.process_1|array_metadatas/process_1)(/|$)")
others = [str(p) for p in by_process_1 if not own_shards.search(str(p))]
assert not others, others
for name in ("config.json", "metrics.jsonl"):
    assert (workdir / name).stat().st_mode & stat.S_IROTH, name
print(f"   process 1 wrote {len(by_process_1)} files, all its own checkpoint shards")
EOF

echo "3/3 kill -9 of one process after a checkpoint, restart of both"
port=$(free_port)
start_process "$OUT/kill" 0 "$port"; start_process "$OUT/kill" 1 "$port"
while :; do
  newest=$(ls "$OUT/kill/checkpoints/periodic" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
  [ -n "$newest" ] && [ "$newest" -ge "$KILL_AFTER_STEP" ] && break
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "the job ended before a checkpoint at step >= $KILL_AFTER_STEP"
  sleep 0.2
done
{ kill -9 "${PIDS[1]}"; sleep 2; kill -9 "${PIDS[0]}"; wait "${PIDS[0]}" "${PIDS[1]}"; } 2>/dev/null || true
echo "   killed after the checkpoint of step $newest; restarting both"
two_processes "$OUT/kill"
grep -q "resuming from checkpoint step" "$OUT/kill.process0.log" || fail "the restarted run did not resume"
"$PYTHON" - "$OUT/two/metrics.jsonl" "$OUT/kill/metrics.jsonl" <<'EOF' || fail "the resumed run's metrics differ"
import json, sys
from urnet_jax.workdir import TIMING_KEYS
whole, resumed = ([{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in open(path)]
                  for path in sys.argv[1:])
assert whole == resumed, (whole, resumed)
print("   the resumed run's metrics equal the uninterrupted run's")
EOF
grep "resuming from" "$OUT/kill.process0.log" | sed 's/^/   /'
echo "multihost_check: all checks passed ($OUT)"
