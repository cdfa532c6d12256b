#!/usr/bin/env bash
# Local launcher: ./launch.sh CONFIG WORKDIR [--config.x.y=value ...]
# e.g. ./launch.sh configs/resnet.py:plain56 runs/plain56 --config.train.num_epochs=3
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec python -m cvjax.main --config="$config" --workdir="$workdir" "$@"
