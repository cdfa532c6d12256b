#!/usr/bin/env bash
# One entry point for every place a run goes:
#   ./launch.sh CONFIG WORKDIR [--config.x.y=value ...]              one run, here
#   ./launch.sh CONFIG WORKDIR --sweep=FILE[:arg] [--only=a,b] [...]  a sweep, one subfolder a trial
#   ./launch.sh tpu --name=N --zone=Z --type=T [--spot] [--delete] [--parallel=K] [--dry-run] \
#       CONFIG WORKDIR [...]                                          on a Cloud TPU slice
#   ./launch.sh slurm --nodes=N --gpus_per_node=G [--partition=P] [--time=T] [--dry-run] \
#       CONFIG WORKDIR [...]                                          as a Slurm job
# e.g. ./launch.sh configs/resnet.py:plain56 runs/plain56 --config.train.num_epochs=3
#      ./launch.sh configs/resnet.py runs/depth --sweep=experiments/depth_ablation.py:quick
# Run it from the repository root. See docs/cluster.md: "Running on Cloud TPU", "Running on Slurm".
# Runs with $PYTHON if set, else python3 from PATH (an activated virtual environment's).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import absl, ml_collections' 2>/dev/null; then
  echo "launch.sh: $(command -v "$PYTHON" || echo "$PYTHON") cannot import cvjax's requirements" \
    "(absl, ml_collections). Activate the environment that has requirements.txt installed, or" \
    "set PYTHON=/path/to/that/python." >&2
  exit 2
fi
if [ $# -ge 1 ] && { [ "$1" = tpu ] || [ "$1" = slurm ]; }; then
  exec "$PYTHON" -m cvjax.cluster.launch "$@"
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 [tpu|slurm ...] CONFIG WORKDIR [--sweep=FILE[:arg]] [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
for arg in "$@"; do
  if [[ $arg == --sweep=* ]]; then
    exec "$PYTHON" -m cvjax.sweep --config="$config" --workdir="$workdir" "$@"
  fi
done
exec "$PYTHON" -m cvjax.main --config="$config" --workdir="$workdir" "$@"
