# The GPU work of urnet_jax in one command on a bare GPU machine without network access: the runs of the
# GPU study (configs/study_gpu.py, docs/RESULTS.md) and/or the train-step benchmark against torch
# (docs/BENCHMARKS.md).
#
#   OUT=/path/to/output bash scripts/gpu_session.sh study|bench|all   # from the repository root; all = both
#
# Needs, beside the repository: .whl/ (the wheels of scripts/gpu_wheels.txt) and .gpu/pbc_subset/ (the
# 1875 JPEGs of the study's 625-per-class PBC subset, as real files: `cp -rL
# results/study_cpu/_prepared/subset .gpu/pbc_subset`; `python -m urnet_jax.study run --config
# configs/study_cpu.py --out results/study_cpu` makes that folder of links, and skips the finished runs),
# about 45 MB together.
#
# Writes to $OUT: gpu.txt (card and versions), study.log (every study process's log), gpu_usage.csv
# (nvidia-smi every 15 s during the study), study_gpu.tgz (each run's config.json, metrics.jsonl,
# eval/metrics.json, eval/enhancer_output.json and error.log, and the seed-1 Net4 runs' evaluation
# figures: unpack it in results/study_gpu/ and run `python -m urnet_jax.study report results/study_gpu
# --out docs/RESULTS.md`) and bench_bBATCH.log (one per benchmarked batch size).
#
# The study runs one process per --only pattern of STUDY_GROUPS, side by side on the one GPU (default: the
# 8 cells net1..net4 x raw/stainfree_proxy; each process runs its seeds in order, so seed 1 of every cell
# comes first). Each is stopped by SIGINT after STUDY_SECONDS (360): it saves a checkpoint and exits, and
# a later call on the same machine resumes it. BENCH_SECONDS (150) limits the benchmark; within 600 s,
# `all` fits STUDY_SECONDS=390 BENCH_SECONDS=150. BENCH_RUNS="32:300:eager,compile 128:230:eager" times
# batch 32 against torch eager and compiled for up to 300 s, then batch 128 against torch eager for up to
# 230 s (items BATCH:SECONDS[:TORCH_VARIANTS]; BENCH_ARGS without --batch). BENCH_ARGS and STUDY_OVERRIDES
# (--config.KEY=VALUE ...) serve tiny trials of this script on a CPU (there with
# --config.base.precision=float32: XLA:CPU of jaxlib 0.11 computes the bfloat16 forward pass wrongly, and
# bfloat16 brings no speed on a CPU).
set -u
MODE=${1:-}
case $MODE in study | bench | all) ;; *) echo "usage: bash scripts/gpu_session.sh study|bench|all" >&2; exit 2 ;; esac
: "${OUT:?OUT must name the folder for the logs and results}"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
  python3 -c 'import importlib.metadata as md, jax
for name in ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "torchvision", "tensorflow-datasets", "grain"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
print("jax devices:", jax.devices())'
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [ "$MODE" != bench ]; then
  start=$SECONDS
  mkdir -p /tmp/study_logs
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$OUT/gpu_usage.csv" 2>&1 &
  monitor=$!
  pids=()
  set -f  # the patterns are globs for --only, not for the shell
  for pattern in ${STUDY_GROUPS:-net1-raw-* net2-raw-* net3-raw-* net4-raw-* net1-stainfree_proxy-* \
      net2-stainfree_proxy-* net3-stainfree_proxy-* net4-stainfree_proxy-*}; do
    # Side by side on one GPU: each process takes memory as it needs it. SIGINT first: the runner stops
    # between steps after a checkpoint and says how to resume.
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 20 "${STUDY_SECONDS:-360}" python3 -m urnet_jax.study run \
      --config configs/study_gpu.py:.gpu/pbc_subset --out results/study_gpu --only "$pattern" --delete-checkpoints \
      --noprogress ${STUDY_OVERRIDES:-} > "/tmp/study_logs/${#pids[@]}.log" 2>&1 &
    pids+=($!)
  done
  set +f
  wait "${pids[@]}"
  kill "$monitor" 2>/dev/null
  for log in /tmp/study_logs/*.log; do echo "== $log"; cat "$log"; done > "$OUT/study.log"
  echo "study: ${#pids[@]} processes done after $((SECONDS - start)) s" >> "$OUT/study.log"
  grep -h -E "finished in|FAILED|stopped" "$OUT/study.log"; tail -n 1 "$OUT/study.log"
  if [ -d results/study_gpu ]; then
    (cd results/study_gpu && find . -path ./_prepared -prune -o -type f \( -name study.json -o -name config.json \
      -o -name metrics.jsonl -o -path '*/eval/metrics.json' -o -name enhancer_output.json -o -name error.log \
      -o -path './net4-*-seed1/eval/*.png' \) -print | tar czf "$OUT/study_gpu.tgz" -T -)
  fi
fi

if [ "$MODE" != study ]; then
  # One benchmark process per BATCH:SECONDS[:TORCH_VARIANTS] item of BENCH_RUNS (default: batch 32 for
  # BENCH_SECONDS against torch eager), each stopped after its SECONDS; bench_bBATCH.log keeps its output.
  # BENCH_TRACE=1 adds a profile of two JAX train steps (the slowest XLA ops, in the log's RESULT line; the
  # trace itself in trace_bBATCH.tgz).
  for item in ${BENCH_RUNS:-32:${BENCH_SECONDS:-150}}; do
    IFS=: read -r batch seconds variants <<< "$item"
    start=$SECONDS log="$OUT/bench_b$batch.log" trace=()
    [ "${BENCH_TRACE:-0}" = 1 ] && trace=(--trace-dir "/tmp/trace_b$batch")
    timeout "$seconds" python3 bench/train_step.py ${BENCH_ARGS:---enhancer urnet --enhancer-width 64 \
      --classifier resnet101 --size 200 --precision bfloat16 --steps 10 --rounds 3} --batch "$batch" \
      --torch-variants "${variants:-eager}" "${trace[@]}" > "$log" 2>&1
    echo "bench rc=$? after $((SECONDS - start)) s" >> "$log"
    [ ${#trace[@]} -gt 0 ] && [ -d "/tmp/trace_b$batch" ] && tar czf "$OUT/trace_b$batch.tgz" -C /tmp "trace_b$batch"
    tail -n 14 "$log"
  done
fi
