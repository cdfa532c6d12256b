#!/usr/bin/env bash
# Local launcher:
#   ./launch.sh CONFIG WORKDIR [--config.x.y=value ...]              one run
#   ./launch.sh CONFIG WORKDIR --sweep=FILE[:arg] [--only=a,b] [...]  a sweep, one subfolder a trial
# e.g. ./launch.sh configs/resnet.py:plain56 runs/plain56 --config.train.num_epochs=3
#      ./launch.sh configs/resnet.py runs/depth --sweep=experiments/depth_ablation.py:quick
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--sweep=FILE[:arg]] [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
for arg in "$@"; do
  if [[ $arg == --sweep=* ]]; then
    exec python -m cvjax.sweep --config="$config" --workdir="$workdir" "$@"
  fi
done
exec python -m cvjax.main --config="$config" --workdir="$workdir" "$@"
