"""Scalars to TensorBoard event files and to metrics.jsonl in the workdir.

tensorboardX writes the event files, so no TensorFlow is needed to log.
"""

import json
import os
import sys


def summary_writer(logdir, **kwargs):
  """tensorboardX's SummaryWriter, imported with PyTorch hidden: tensorboardX imports torch
  when it is installed (~4 s) only to accept torch tensors, which cvjax never logs."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` now raises ImportError.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir, **kwargs)

import jax


class MetricWriter:
  """Writes `{tag: value}` per step; on resume drops what the interrupted run
  logged past the checkpoint, so curves and metrics.jsonl have each step once."""

  def __init__(self, workdir, resume_step=0):
    # purge_step tells TensorBoard to discard older events at steps >= resume_step + 1.
    self.tb = summary_writer(workdir, purge_step=resume_step + 1 if resume_step else None)
    self.jsonl = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.jsonl):
      with open(self.jsonl) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(self.jsonl, 'w') as f:
        f.writelines(kept)

  def write_scalars(self, step, scalars):
    scalars = {k: float(v) for k, v in scalars.items()}
    for tag, value in scalars.items():
      self.tb.add_scalar(tag, value, step)
    with open(self.jsonl, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')

  def records(self):
    """Everything in metrics.jsonl so far."""
    if not os.path.exists(self.jsonl):
      return []
    with open(self.jsonl) as f:
      return [json.loads(line) for line in f if line.strip()]

  def write_hparams(self, hparams, metrics):
    """One HParams entry for the run: its config beside its final metrics."""
    self.tb.add_hparams(hparams, {f'hparams/{k}': v for k, v in metrics.items()}, name='hparams')

  def flush(self):
    self.tb.flush()

  def close(self):
    self.tb.close()


class NullWriter:
  """What processes other than 0 of a multi-process run write: nothing."""

  def write_scalars(self, step, scalars):
    pass

  def records(self):
    return []

  def write_hparams(self, hparams, metrics):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create(workdir, resume_step=0):
  """Process 0 logs; in a multi-process run the others would write the same lines again."""
  return MetricWriter(workdir, resume_step) if jax.process_index() == 0 else NullWriter()
