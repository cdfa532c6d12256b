#!/usr/bin/env bash
# The GPU check in one command: the ResNet benchmarks, then ResNet-20 and plain-20 trained
# side by side with the paper's recipe on the CIFAR-10 JPEG copy; writes docs/results/gpu.json.
#
#   experiments/gpu_check.sh                      # on a machine with one GPU, from the repo root
#   STEPS=20 BENCH_STEPS=2 QUICK=1 RESULTS=/tmp/gpu.json experiments/gpu_check.sh  # smoke run
#
# Needs: the packages of requirements.txt (or wheels of the missing ones in .whl/, installed
# into /tmp/site), the CIFAR-10 archive at $CIFAR (default data/cifar10-jpeg.tar.gz, a copy of
# ../shared/data/cifar10-jpeg.tar.gz). Logs, benchmark output and the run folders (as
# runs.tar.gz, to resume from in a later call) go to $OUT (default runs/gpu_check).
# TRAIN_SECONDS bounds the training: at that point the runs get SIGTERM, checkpoint and stop;
# calling the script again with RESUME=$OUT/runs.tar.gz continues them where they stopped
# (BENCH=0 skips the benchmarks in such a call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
CIFAR=${CIFAR:-data/cifar10-jpeg.tar.gz}
STEPS=${STEPS:-64000}          # He et al.: 64k steps of batch 128, lr /10 at 32k and 48k.
BENCH_STEPS=${BENCH_STEPS:-50}
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
RUNS=${RUNS:-runs/gpu_runs}
RESULTS=${RESULTS:-docs/results/gpu.json}
mkdir -p "$OUT" "$RUNS"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -n "${RESUME:-}" ] && tar -xzf "$RESUME" -C "$RUNS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' || exit 1

# 1. Benchmarks. ResNet-50 at 224 in bf16 (the ImageNet recipe's step), then the CIFAR nets at
#    batch 128 and 512: if a 4x larger batch costs far less than 4x the step time, the step at
#    128 is bound by kernel launches, not by the GPU's arithmetic; the CIFAR step is also timed
#    with XLA's command buffers off, to see what they give.
bench() {  # The benchmark's last line is its JSON; the XLA flags it ran with are added to it.
  python3 -m cvjax.tools.benchmark --steps="$BENCH_STEPS" "$@" | tee -a "$OUT/benchmark.txt" \
    | tail -n 1 | python3 -c 'import json, os, sys
print(json.dumps({**json.load(sys.stdin), "xla_flags": os.environ.get("XLA_FLAGS", "")}))' \
    >> "$OUT/benchmark.jsonl"
}
touch "$OUT/benchmark.jsonl"
if [ "${BENCH:-1}" != 0 ]; then
  [ -z "${QUICK:-}" ] && \
    bench --model=imagenet_resnet50 --batch_size=256 --dtype=bfloat16 --variants=one_program
  bench --model=resnet20,resnet56 --batch_size=128 --variants=one_program,split
  bench --model=resnet20 --batch_size=512 --variants=one_program
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    bench --model=resnet20 --batch_size=128 --variants=one_program
fi

# 2. ResNet-20 and plain-20, side by side on the one GPU (each may take 45% of its memory).
train() {  # name, config arg
  local start=$SECONDS
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout --signal=TERM --kill-after=60 "$TRAIN_SECONDS" \
    python3 -m cvjax.main --config="configs/resnet.py:$2" --workdir="$RUNS/$1" \
    --config.dataset.path="$CIFAR" --config.train.num_steps="$STEPS" \
    --config.train.eval_every_steps=2000 \
    --config.train.keep_checkpoints=1 \
    > "$OUT/$1.log" 2>&1
  echo "$1 exit $? after $((SECONDS - start)) s"
  echo $((SECONDS - start)) >> "$RUNS/$1/wall_seconds"
}
# Decode the JPEGs once, into cvjax's dataset cache, before both runs read them.
python3 -c "from cvjax.data import memory; memory.load_local('$CIFAR')" || exit 1
train resnet20 resnet20 & first=$!
train plain20 plain20 & second=$!
wait "$first" "$second"  # (A bare `wait` would also wait for the log's tee.)
tail -n 3 "$OUT"/resnet20.log "$OUT"/plain20.log

# 3. The results file, and the run folders (checkpoints included) to resume from.
python3 -m cvjax.tools.gpu_results --benchmarks="$OUT/benchmark.jsonl" --runs="$RUNS" \
  --out="$RESULTS" && cp "$RESULTS" "$OUT/gpu.json"
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" .
