# The GPU work of urnet_jax in one call on a bare GPU machine without network (this project's `device`
# tool): the train-step benchmark against torch (docs/BENCHMARKS.md) and/or the first runs of the GPU
# study (configs/study_gpu.py, docs/RESULTS.md).
#
#   bash scripts/gpu_session.sh bench|study|all      # from the repository root; `all` = bench, then study
#
# Needs, beside the repository: .whl/ (the wheels of scripts/gpu_wheels.txt) and .gpu/pbc_subset/ (the
# 1875 JPEGs of the study's 625-per-class PBC subset, as real files: `cp -rL results/study_cpu/_prepared/subset
# .gpu/pbc_subset`; `python -m urnet_jax.study run --config configs/study_cpu.py --out results/study_cpu`
# makes that folder of links, and skips the finished runs), about 45 MB together. Writes to $OUT: gpu.txt (card and versions), bench.log,
# study.log and study_gpu.tgz (each run's config.json, metrics.jsonl, eval/metrics.json, error.log; unpack
# it in results/study_gpu/ and run `python -m urnet_jax.study report results/study_gpu --out docs/RESULTS.md`).
# Env: BENCH_SECONDS (240) and STUDY_SECONDS (300) limit the two parts (for `all` within one 600 s call,
# STUDY_SECONDS=260 or less); STUDY_RUNS ('net1-raw-seed1 net4-raw-seed1'): the --only patterns;
# BENCH_ARGS and STUDY_OVERRIDES (--config.KEY=VALUE ...): for tiny CPU trials of this script (with
# --config.base.precision=float32 there: README, "Known issues").
set -u
MODE=${1:-}
case $MODE in bench | study | all) ;; *) echo "usage: bash scripts/gpu_session.sh bench|study|all" >&2; exit 2 ;; esac
: "${OUT:?OUT must name the folder whose files come back}"

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

if [ "$MODE" != study ]; then
  start=$SECONDS
  timeout "${BENCH_SECONDS:-240}" python3 bench/train_step.py ${BENCH_ARGS:---enhancer urnet --enhancer-width 64 \
    --classifier resnet101 --size 200 --batch 32 --precision bfloat16 --steps 10 --rounds 3} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? after $((SECONDS - start)) s" >> "$OUT/bench.log"
  tail -n 12 "$OUT/bench.log"
fi

if [ "$MODE" != bench ]; then
  only=()
  for pattern in ${STUDY_RUNS:-net1-raw-seed1 net4-raw-seed1}; do only+=(--only "$pattern"); done
  start=$SECONDS
  # SIGINT first: the runner stops between steps and says how to resume.
  timeout -s INT -k 30 "${STUDY_SECONDS:-300}" python3 -m urnet_jax.study run --config configs/study_gpu.py:.gpu/pbc_subset \
    --out results/study_gpu "${only[@]}" --delete-checkpoints --no-progress ${STUDY_OVERRIDES:-} > "$OUT/study.log" 2>&1
  echo "study rc=$? after $((SECONDS - start)) s" >> "$OUT/study.log"
  tail -n 15 "$OUT/study.log"
  if [ -d results/study_gpu ]; then
    (cd results/study_gpu && find . -path ./_prepared -prune -o -type f \( -name study.json -o -name config.json \
      -o -name metrics.jsonl -o -path '*/eval/metrics.json' -o -name error.log \) -print | tar czf "$OUT/study_gpu.tgz" -T -)
  fi
fi
