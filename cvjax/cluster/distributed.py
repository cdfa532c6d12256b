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
Joining waits for the coordinator (process 0) and the other processes, saying so, for at
most `timeout` seconds (--distributed_timeout); SIGTERM and SIGINT stop the wait.
"""

import os
import socket
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils

from cvjax.errors import UserError

MODES = ('auto', 'on', 'off')
JOIN_TIMEOUT = 300  # Seconds; JAX's own default.
NOTE_EVERY = 30  # Seconds between "still waiting" notes.


def started_as_group():
  """Whether Slurm (`srun`) or Open MPI (`mpirun`) started this process with peers."""
  slurm = int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1 and all(
      v in os.environ for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID'))
  return slurm or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1


def initialize(mode='auto', coordinator_address=None, num_processes=None, process_id=None,
               timeout=JOIN_TIMEOUT):
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
  if timeout <= 0:
    raise UserError(f'--distributed_timeout={timeout}; expected a positive number of seconds.')
  try:
    _join(coordinator_address, num_processes, process_id, timeout)
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


def _join(coordinator_address, num_processes, process_id, timeout):
  """`jax.distributed.initialize` in a helper thread, while this one waits: JAX blocks in C++
  until every process has joined (a signal handler would not run until then), and at its
  own timeout aborts the process with a C++ stack trace. Here the wait is said, a signal
  reaches the handlers of the main thread (cvjax.main's exit cleanly), and the timeout is
  a UserError that says what did not answer."""
  failed = []

  def join():
    try:  # JAX's deadline comes after ours, so that ours is the one the user meets.
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=timeout + 60)
    except Exception as e:  # pylint: disable=broad-except
      failed.append(e)
  who = (f'process {process_id} of {num_processes}' if process_id is not None
         else 'this process (its rank detected from the cluster)')
  where = f'at {coordinator_address}' if coordinator_address else '(its address detected)'
  logging.warning('Joining the multi-process run as %s: waiting for the coordinator %s and '
                  'every process to join (up to %d s, --distributed_timeout).', who, where,
                  timeout)
  thread = threading.Thread(target=join, name='cvjax-join', daemon=True)
  start = time.monotonic()
  thread.start()
  while thread.is_alive():
    thread.join(0.5)
    waited = time.monotonic() - start
    if thread.is_alive() and waited >= timeout:
      raise UserError(f'could not join the multi-process run as {who} within {timeout} s: '
                      f'{_why_not_joined(coordinator_address, num_processes)}')
    if thread.is_alive() and int(waited) // NOTE_EVERY > int(waited - 0.5) // NOTE_EVERY:
      logging.warning('Still waiting for the coordinator %s and the other processes (%d s of '
                      '%d s).', where, waited, timeout)
  if failed:
    raise failed[0]


def _why_not_joined(address, num_processes):
  """What the wait most likely lacked: a coordinator that does not answer, or processes."""
  if address:
    host, _, port = address.rpartition(':')
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
      return (f'nothing answers at the coordinator address {address} '
              f'({getattr(e, "strerror", None) or e}). Process 0 hosts the coordinator: start '
              'it (the same command with --process_id=0), and check the address, the port and '
              'that no firewall blocks it; --distributed_timeout=SECONDS waits longer.')
    return (f'the coordinator at {address} answers, but not all '
            f'{num_processes or "the"} processes joined. Start every process with the same '
            '--coordinator_address and --num_processes and its own --process_id; '
            '--distributed_timeout=SECONDS waits longer.')
  return ('the coordinator or the other processes did not answer. Check that every process '
          'of the job started; --distributed_timeout=SECONDS waits longer.')
