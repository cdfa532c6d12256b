"""Joins the processes of a multi-process run: a TPU pod slice, a Slurm job, MPI ranks.

JAX's own runtime does the work (`jax.distributed.initialize`); this module only decides
whether a run is multi-process, so a single-process run never waits for peers that do not
exist. `mode`:
  auto  initialize when the processes were started as a group JAX can describe: explicit
        coordinator flags (or JAX_COORDINATOR_ADDRESS), an `srun` step of more than one
        task, or an Open MPI job of more than one rank; otherwise stay single-process.
  on    always initialize; JAX detects what was not given (Cloud TPU VMs, Slurm, Open MPI).
        `launch.sh tpu` passes this: a pod slice does not say so in the environment.
  off   never.
"""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils

from cvjax.errors import UserError

MODES = ('auto', 'on', 'off')


def started_as_group():
  """Whether Slurm (`srun`) or Open MPI (`mpirun`) started this process with peers."""
  slurm = int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1 and all(
      v in os.environ for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID'))
  return slurm or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1


def initialize(mode='auto', coordinator_address=None, num_processes=None, process_id=None):
  """Calls `jax.distributed.initialize` when the run is multi-process; returns whether it did.

  Must run before anything touches a JAX backend. Process 0 then tells the story; the
  others log warnings and errors only.
  """
  if mode not in MODES:
    raise UserError(f'--distributed={mode!r}; expected one of {", ".join(MODES)}.')
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  explicit = [coordinator_address, num_processes, process_id]
  if mode == 'off' or (mode == 'auto' and explicit == [None] * 3 and not started_as_group()):
    return False
  if mode == 'auto' and None in explicit and not started_as_group():
    raise UserError(
        '--coordinator_address, --num_processes and --process_id go together (got '
        f'{coordinator_address!r}, {num_processes!r}, {process_id!r}): give all three, e.g. '
        '--coordinator_address=host0:1234 --num_processes=2 --process_id=0 on the first '
        'process, or --distributed=on to let JAX detect the cluster.')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    raise UserError(f'could not join the multi-process run ({e}). Check that every process '
                    'got the same coordinator address and process count, and its own '
                    'process id.') from e
  if jax.process_index():
    logging.set_verbosity(logging.WARNING)
  return True


def host_values(tree):
  """`jax.device_get(tree)`, also for arrays split over the devices of several processes (a
  population's members, one per device): those are gathered from every process, which must all
  call this at the same point. Arrays this process holds whole, or replicated, are read
  locally, so a single-process run reads exactly what `jax.device_get` does."""
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.device_get(jax.tree.map(one, tree))
