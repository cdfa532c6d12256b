#!/usr/bin/env bash
# The GPU check in one command of under 10 minutes on one GPU: the benchmarks (ImageNet
# ResNet-50; CIFAR ResNet-20 as one run and as a population of 10, 1 and K steps per dispatch),
# then the paper's CIFAR-10 recipe (He et al. 2015, 64k steps of 128) as populations: for each
# depth, 5 seeds of the ResNet and 5 of its plain twin in one program. Writes
# docs/results/gpu.json (cvjax.tools.gpu_results). This is the project's own check for a GPU
# lent to it one call at a time; to run the papers' recipes on yours: docs/accelerators.md.
#
#   experiments/gpu_check.sh                                   # one GPU, from the repo root
#   BENCH=0 RESUME=<folder with runs.tar.gz, resume.tar.gz.*> experiments/gpu_check.sh  # resume
#   STEPS=20 BENCH_STEPS=2 QUICK=1 SEEDS=2 DEPTHS=20 PER_CALL=5 TRAIN_SECONDS=120 \
#     STOP_SECONDS=150 CIFAR=cifar10.tar.gz OUT=runs/smoke \
#     RUNS=runs/smoke/runs RESULTS=runs/smoke/gpu.json experiments/gpu_check.sh  # on a CPU
#
# Needs: the packages of requirements.txt, checked first (or wheels of the missing ones in .whl/, installed
# into /tmp/site; on the H200 image of 2026-11 those are ml-collections and tensorboardX), the
# CIFAR-10 archive at $CIFAR (default data/cifar10-jpeg.tar.gz: your copy as an image-folder
# .tar.gz, e.g. from `python -m cvjax.data.convert_cifar10`). What comes back is in $OUT
# (default runs/gpu_check), at most 8 files: gpu_check.log (everything printed, the benchmark tables included),
# benchmark.jsonl, gpu.json, runs.tar.gz (the run folders without checkpoints: each member's
# metrics, results, error analysis, and the training logs as <run>/train.log), and
# resume.tar.gz.00, .01, ... (the checkpoints of the runs left unfinished, in parts of 15 MiB).
# A later call with RESUME=<a folder holding those files> continues the unfinished runs
# (BENCH=0 skips the benchmarks); finished runs are not trained again.
#
# Time: the whole script stops its training CALL_SECONDS (default 540) after it started, less
# STOP_SECONDS (30) + 10 s to stop, collect and pack, or TRAIN_SECONDS after the training began
# if that is sooner: the run in progress gets SIGTERM, checkpoints the step it is at and stops
# (SIGKILL STOP_SECONDS later, losing the steps since its last checkpoint). Depths train one
# after another in the order of DEPTHS, each in the time left (not started with less than
# MIN_SECONDS left). One after another rather than side by side: two processes on one GPU
# share it by time slices (no MPS), so two depths side by side take about the sum of their
# times and neither finishes early, while the shallow net alone on the GPU has a chance to
# finish its 64k steps in one call (a finished population is a Table 6 row with seeds; a
# partial one, before the lr drops at 32k and 48k, is not comparable with the paper).
#
# PLAN for one 10-minute H200 call. AN ESTIMATE FROM FLOP COUNTS, NOT A RESULT: nothing here
# has run on a GPU. FLOPs are XLA's cost analysis on CPU (what cvjax.tools.benchmark reports as
# gflops_per_step): CIFAR ResNet-20 forward 74.8 MFLOP/image, train step at batch 128
# 28.76 GFLOP (3.01x the forward); ResNet-32/44/56 steps 48.75 / 68.74 / 88.74 GFLOP;
# ImageNet ResNet-50 at 224, bf16, batch 256: 5,693 GFLOP per step (22.2 GFLOP/image).
# Peak: 989 TFLOP/s dense bf16 (the CIFAR nets run float32, whose peak is lower: their
# assumed utilisation is of the bf16 peak all the same). ASSUMED utilisation (a guess, to be
# replaced by what this call measures): 20% for ResNet-50 (MLPerf's 7.9k img/s per H200 is
# ~18% by this count), 5% for a CIFAR population of 10 at batch 128 (16-64 channel
# convolutions, many small kernels a step), 1% for one CIFAR run (bound by kernel launches).
# Compile times are not FLOPs: the figures below are guesses, ~60 s for ResNet-50 (and as
# much again if its FLOP count, which compiles the step under JAX's GPU plugin, misses the
# compilation cache) and ~25 s for each CIFAR program.
#   row / phase                        steps (FLOP-based time)            compile   total
#   start: wheels, JAX, nvidia-smi     -                                  -         ~20 s
#   ResNet-50 bf16 b256                54 x 28.8 ms = 1.6 s               ~60 s     ~70 s
#   CIFAR decode (beside ResNet-50)    on one CPU core, 8-25 s            -         0 s
#   ResNet-20 b128, P=1,10 x K=1,20    P=1 2.9 ms/step, P=10 5.8 ms/step  4 x ~25   ~110 s
#   EXTRA_BENCH=1 (b512; no command    ~1 s each                          2 x ~20   ~45 s
#     buffers): off, not in the budget
#   depth 20, P=10, K=20, 64k steps    64k x 5.8 ms = 372 s, evals ~10 s  ~40 s     ~420 s
#   stop, gpu_results, pack            -                                  -         ~30 s
# So a call (CALL_SECONDS=540 under the device's 600 s) fits the benchmarks and ~300 s of
# training: depth 20 gets to ~45k of its 64k steps at 5% (it finishes, in ~230 s with its
# compile, at 10%; depth 56 then has under MIN_SECONDS left and does not start). The four
# depths' populations need 372 + 630 + 889 + 1148 s = ~51 min at 5% (~25 min at 10%): the
# full Table 6 (four depths x 5 seeds x ResNet/plain) takes several calls, resumed. Size
# limits resuming: a population's checkpoint holds params and momentum in float32,
# 2 x 4 B x 10 members x 0.27M / 0.46M / 0.66M / 0.85M params = ~22 / 37 / 53 / 68 MB for
# depths 20 / 32 / 44 / 56 (gzip saves ~6%: 8.1 MB for 4 ResNet-20 members, measured on a
# CPU); what comes back from $OUT is at most 4 parts of 15 MiB, and what travels to a call
# at most 64 MiB with the CIFAR archive (19 MB) and the wheels: an unfinished depth 44 or 56
# cannot be carried to a later call; finish it within one, or give it fewer seeds (SEEDS).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
CIFAR=${CIFAR:-data/cifar10-jpeg.tar.gz}
STEPS=${STEPS:-64000}            # He et al.: 64k steps of batch 128, lr /10 at 32k and 48k.
BENCH_STEPS=${BENCH_STEPS:-50}
DEPTHS=${DEPTHS:-20 56 32 44}    # In order of priority: 20 and 56 are Table 6's ends.
SEEDS=${SEEDS:-5}                # Per net: SEEDS ResNets and SEEDS plain nets in one program.
PER_CALL=${PER_CALL:-20}         # train.steps_per_call; divides log (100), eval and ckpt steps.
EVAL_EVERY=${EVAL_EVERY:-1000}   # 64 points of the error curve; ~10 s of 64k steps at depth 20.
CALL_SECONDS=${CALL_SECONDS:-540}
TRAIN_SECONDS=${TRAIN_SECONDS:-}
MIN_SECONDS=${MIN_SECONDS:-90}
STOP_SECONDS=${STOP_SECONDS:-30}  # SIGTERM to SIGKILL: the steps in flight, an eval, the save.
RUNS=${RUNS:-runs/gpu_runs}
RESULTS=${RESULTS:-docs/results/gpu.json}
if [ -n "${QUICK:-}" ]; then  # The smallest form: no ResNet-50, populations of 1 and 2.
  BENCH_POPULATION=${BENCH_POPULATION:-1,2}
  BENCH_PER_CALL=${BENCH_PER_CALL:-1,2}
fi
BENCH_POPULATION=${BENCH_POPULATION:-1,10}
BENCH_PER_CALL=${BENCH_PER_CALL:-1,$PER_CALL}
mkdir -p "$OUT" "$RUNS"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Every package a phase imports, imported now: a missing one stops the check in seconds, not
# after minutes of benchmarks (exit 3, nothing run).
python3 - <<'EOF' || exit 3
import importlib, sys
NEEDED = {'jax': 'jax', 'flax': 'flax', 'optax': 'optax', 'orbax.checkpoint': 'orbax-checkpoint',
          'etils.epath': 'etils[epath]', 'absl': 'absl-py', 'ml_collections': 'ml-collections',
          'tensorboardX': 'tensorboardX', 'PIL': 'pillow', 'matplotlib': 'matplotlib',
          'filelock': 'filelock', 'grain': 'grain'}
missing = []
for module, package in NEEDED.items():
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except  # ImportError, or a broken install.
    missing.append(f'{package} (import {module}: {type(e).__name__}: {e})')
if missing:
  sys.exit('gpu_check: missing packages, nothing was run: ' + '; '.join(missing)
           + '. Install them (requirements.txt pins them) or put their wheels in .whl/.')
print('gpu_check: every needed package imports.')
EOF
if [ -n "${RESUME:-}" ]; then  # A folder of what an earlier call left in $OUT (or its tar).
  if [ -f "$RESUME" ]; then
    tar -xzf "$RESUME" -C "$RUNS" || exit 1
  else
    tar -xzf "$RESUME/runs.tar.gz" -C "$RUNS" || exit 1
    if ls "$RESUME"/resume.tar.gz.* >/dev/null 2>&1; then
      cat "$RESUME"/resume.tar.gz.* | tar -xzf - -C "$RUNS" || exit 1
    fi
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' || exit 1

# Decode the JPEGs once, into cvjax's dataset cache, on the CPU (one core of many) while the
# ResNet-50 benchmark runs; the training waits for it.
JAX_PLATFORMS=cpu python3 -c "from cvjax.data import memory; memory.load_local('$CIFAR')" &
decode=$!

# 1. Benchmarks (XLA's convolutions: --conv=xla; on a GPU there are no others).
bench() {  # The benchmark's last line is its JSON; the XLA flags it ran with are added to it.
  python3 -m cvjax.tools.benchmark --steps="$BENCH_STEPS" --conv=xla "$@" \
    | tee /dev/stderr | tail -n 1 | python3 -c 'import json, os, sys
print(json.dumps({**json.load(sys.stdin), "xla_flags": os.environ.get("XLA_FLAGS", "")}))' \
    >> "$OUT/benchmark.jsonl"
}
touch "$OUT/benchmark.jsonl"
if [ "${BENCH:-1}" != 0 ]; then
  # ResNet-50 at 224 in bf16, the ImageNet recipe's step.
  [ -z "${QUICK:-}" ] && \
    bench --model=imagenet_resnet50 --batch_size=256 --dtype=bfloat16 --variants=one_program
  # ResNet-20 at batch 128 as one run and as a population, 1 and K steps per dispatch: images/s
  # in all and per member; `vs P x 1` in the table is the population's cost against P runs.
  bench --model=resnet20 --batch_size=128 --variants= --population="$BENCH_POPULATION" \
    --steps_per_call="$BENCH_PER_CALL"
  if [ -n "${EXTRA_BENCH:-}" ]; then  # Batch 512 (is 128 launch-bound?), no command buffers.
    bench --model=resnet20 --batch_size=512 --variants=one_program
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
      bench --model=resnet20 --batch_size=128 --variants=one_program
  fi
fi
wait "$decode" || exit 1

# 2. The paper's recipe, one population per depth: the ResNet and its plain twin, SEEDS seeds
#    each, in one program; one depth after another (see the header), each resumable.
start=$SECONDS
deadline=$((CALL_SECONDS - STOP_SECONDS - 10))
if [ -n "$TRAIN_SECONDS" ] && [ $((start + TRAIN_SECONDS)) -lt "$deadline" ]; then
  deadline=$((start + TRAIN_SECONDS))
fi
train() {  # name, depth, seconds
  local t0=$SECONDS
  timeout --signal=TERM --kill-after="$STOP_SECONDS" "$3" \
    python3 -m cvjax.main --config=configs/resnet.py --config.model.depth="$2" \
    --workdir="$RUNS/$1" \
    --config.dataset.path="$CIFAR" --config.train.num_steps="$STEPS" \
    --config.population.seeds="$SEEDS" --config.population.vary='model.residual=False,True' \
    --config.train.steps_per_call="$PER_CALL" --config.train.eval_every_steps="$EVAL_EVERY" \
    --config.train.keep_checkpoints=1 >> "$RUNS/$1/train.log" 2>&1
  local rc=$?
  echo $((SECONDS - t0)) >> "$RUNS/$1/wall_seconds"
  echo "$1: exit $rc after $((SECONDS - t0)) s (124: stopped at the time limit; 75: stopped" \
    "by the signal, checkpoint saved)"
  tail -n 2 "$RUNS/$1/train.log"
}
for depth in $DEPTHS; do
  name=depth$depth
  left=$((deadline - SECONDS))
  if [ -f "$RUNS/$name/results.json" ]; then
    echo "$name: finished in an earlier call."
  elif [ ! -d "$RUNS/$name/checkpoints" ] && cat "$RUNS/$name"/members/*/metrics.jsonl \
      2>/dev/null | grep -q step; then
    echo "$name: trained before, but its checkpoints are not here (too large to come back?):" \
      "not trained again; move $RUNS/$name away to start it from step 0."
  elif [ "$left" -lt "$MIN_SECONDS" ]; then
    echo "$name: not started, ${left} s left (MIN_SECONDS=$MIN_SECONDS)."
  else
    mkdir -p "$RUNS/$name"
    train "$name" "$depth" "$left"
  fi
done

# 3. The results file; the run folders, and the checkpoints of unfinished runs to resume from.
python3 -m cvjax.tools.gpu_results --benchmarks="$OUT/benchmark.jsonl" --runs="$RUNS" \
  --out="$RESULTS" > /dev/null && cp "$RESULTS" "$OUT/gpu.json"
python3 - "$RESULTS" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))['runs']:
  e = r['test_error']
  err = (f"{100 * e['mean']:.2f}" + (f" +- {100 * e['std']:.2f}" if e['std'] is not None else '')
         + f"% at step {r['test_error_step']}") if e['mean'] is not None else 'not evaluated'
  print(f"{r['name']}: {r['members']} members, {r['steps']} steps"
        f"{'' if r['finished'] else ' (unfinished)'}, test error {err}, {r['wall_seconds']:.0f} s")
EOF
tar --exclude='./*/checkpoints' -czf "$OUT/runs.tar.gz" -C "$RUNS" .
unfinished=()
for d in "$RUNS"/*/; do
  d=$(basename "$d")
  if [ -d "$RUNS/$d/checkpoints" ] && [ ! -f "$RUNS/$d/results.json" ]; then
    unfinished+=("$d/checkpoints")
  fi
done
rm -f "$OUT"/resume.tar.gz.*
if [ ${#unfinished[@]} -gt 0 ]; then
  tar -czf - -C "$RUNS" "${unfinished[@]}" | split -b 15M -d -a 2 - "$OUT/resume.tar.gz."
  parts=$(ls "$OUT"/resume.tar.gz.* | wc -l)
  echo "Checkpoints to resume ${unfinished[*]}: $parts part(s) of at most 15 MiB in $OUT."
  [ "$parts" -gt 4 ] && echo "WARNING: more than 4 parts: they will not all come back from" \
    "the device machine (8 files of 16 MiB at most); resuming needs them all."
fi
ls -la "$OUT"
