"""Stopping a run cleanly when asked to: SIGTERM (a preempted VM, a scheduler) or SIGINT (Ctrl-C).

The run finishes the step it is in, saves a checkpoint, flushes its logs and exits with
`errors.PREEMPTED_EXIT_CODE` (75); re-running the same command resumes there. A second signal
stops it at once.

One process: a signal handler sets a flag, read once per step (no device sync). Several
processes (jax.distributed): all must stop after the same step, so the decision is JAX's
preemption sync point, which hears SIGTERM through JAX's own handler and agrees on a step
with the other processes; SIGINT is passed on to it as SIGTERM. JAX's contract is a counter
that every process passes at every step, one more each time (it stops at the largest counter
any process had passed when the notice came, plus one): a step that jumps by
`train.steps_per_call` would skip that point and never stop. So the counter passed is the
number of checks: every process checks at the same points (once at start-up, then after
each call of the train step, whose steps are the same on all processes), and they all stop
after the same call.
"""

import contextlib
import itertools
import os
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils

# A second signal this soon after the first is the same request delivered twice, not a
# request to stop at once.
REPEAT_SECONDS = 1.0


# The checks of this process so far (JAX's sync counter): it only grows, also over the runs
# of one process (a sweep's trials), which every process runs in the same order.
_checks = itertools.count()


class Preempted(Exception):
  """Raised by the training loop after it saved the checkpoint at `step`."""

  def __init__(self, step, signal_name):
    super().__init__(
        f'stopped by {signal_name} after step {step}; the checkpoint at step {step} is saved.'
        if step else f'stopped by {signal_name} during start-up, before the first step; there '
        'was nothing to save yet.')
    self.step = step
    self.signal_name = signal_name


@contextlib.contextmanager
def watch():
  """Yields `stop_requested(step) -> signal name or None`, to call at start-up (step 0) and
  after every call of the train step (its last step); every process calls it at the same
  steps."""
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: None  # Signals reach only the main thread; nothing to watch.
    return
  received, since = [], []

  def on_signal(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if multi:  # JAX's preemption service listens for SIGTERM.
      received.append(name)
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if received and time.monotonic() - since[0] < REPEAT_SECONDS:
      return  # The same request twice (to the process group, and passed on by a sweep).
    if received:  # The second signal: stop now, as if no handler were installed.
      restore()
      os.kill(os.getpid(), signum)
      return
    received.append(name)
    since.append(time.monotonic())
    logging.warning('%s received: finishing the steps in flight (at most two, or the '
                    'evaluation under way), then saving a checkpoint and stopping (send it '
                    'again to stop at once and lose the steps since the last checkpoint).',
                    name)

  # Without JAX's preemption service (jax_enable_preemption_service=False), each process
  # stops on its own signal.
  multi = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
  ours = (signal.SIGINT,) if multi else (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.signal(s, on_signal) for s in ours}

  def restore():
    for s, handler in previous.items():
      signal.signal(s, handler)

  def stop_requested(step):
    if multi:
      if multihost_utils.reached_preemption_sync_point(next(_checks)):
        return received[0] if received else 'SIGTERM'
      return None
    return received[0] if received else None

  try:
    yield stop_requested
  finally:
    restore()
