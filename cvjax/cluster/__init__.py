"""Multi-process runs: joining the peers (distributed) and launching them on Cloud TPU or Slurm
(launch)."""
