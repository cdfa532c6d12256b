"""Scalars to TensorBoard event files and to metrics.jsonl in the workdir.

tensorboardX writes the event files, so no TensorFlow is needed to log. The workdir may be
remote (`gs://...`, any etils.epath path). Object stores cannot append, and tensorboardX's
own gs:// writer uploads the whole event file again at every flush; so for a remote
workdir the events go to a local folder and `sync()` (at each checkpoint and at the end)
uploads them as a finished file of their own and starts a new one: each event is uploaded
once. TensorBoard reads every event file of a run folder. metrics.jsonl, a few KB, is
rewritten whole at each sync.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from absl import logging
from etils import epath
import jax

from cvjax import workdir as workdir_lib
from cvjax.errors import UserError


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


class EventWriter:
  """A tensorboardX SummaryWriter (`.tb`) for a local or remote run folder."""

  def __init__(self, workdir, purge_step=None):
    self.workdir = epath.Path(workdir)
    self.remote = workdir_lib.is_remote(workdir)
    self._staging = tempfile.mkdtemp(prefix='cvjax-events-') if self.remote else None
    self.tb = self._open(purge_step)

  def _open(self, purge_step=None):
    # tensorboardX names a file by the second it opened it and the host; TensorBoard reads a
    # folder's files in name order and applies a resume's purge only to what it read before.
    # A nanosecond suffix keeps files of one host in the order they were opened, also across
    # a resume in the same second (which would otherwise sort first, or overwrite the file).
    suffix = f'.{time.time_ns():019d}'
    return summary_writer(self._staging if self.remote else os.fspath(self.workdir),
                          purge_step=purge_step, filename_suffix=suffix)

  def _upload(self):
    self.tb.close()
    for folder, _, files in os.walk(self._staging):
      target = self.workdir / os.path.relpath(folder, self._staging)
      target.mkdir(parents=True, exist_ok=True)
      for name in files:
        with open(os.path.join(folder, name), 'rb') as f:
          (target / name).write_bytes(f.read())
        os.remove(os.path.join(folder, name))

  def sync(self):
    """Local: flushes. Remote: uploads what was written since the last sync."""
    self.tb.flush()
    if self.remote:
      self._upload()
      self.tb = self._open()

  def close(self):
    if self.remote:
      self._upload()
      shutil.rmtree(self._staging, ignore_errors=True)
    else:
      self.tb.close()


class MetricWriter:
  """Writes `{tag: value}` per step; on resume drops what the interrupted run
  logged past the checkpoint, so curves and metrics.jsonl have each step once."""

  def __init__(self, workdir, resume_step=0):
    # purge_step tells TensorBoard to discard older events at steps >= resume_step + 1: also
    # from 0, after a run killed before its first checkpoint.
    self.events = EventWriter(workdir, purge_step=resume_step + 1)
    self.tb = self.events.tb
    self.jsonl = epath.Path(workdir) / 'metrics.jsonl'
    self._records = []
    if self.jsonl.exists():
      self._records = [r for r in read_records(workdir) if r['step'] <= resume_step]
      self._write_jsonl()

  def _write_jsonl(self):
    self.jsonl.write_text(''.join(json.dumps(r) + '\n' for r in self._records))

  def write_scalars(self, step, scalars):
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    for tag, value in record.items():
      if tag != 'step':
        self.tb.add_scalar(tag, value, step)
    self._records.append(record)
    if not self.events.remote:  # Object stores cannot append: rewritten at sync().
      with self.jsonl.open('a') as f:
        f.write(json.dumps(record) + '\n')

  def records(self):
    """Everything in metrics.jsonl so far."""
    return list(self._records)

  def write_hparams(self, hparams, metrics):
    """One HParams entry for the run: its config beside its final metrics."""
    self.tb.add_hparams(hparams, {f'hparams/{k}': v for k, v in metrics.items()}, name='hparams')

  def sync(self):
    """Makes what was logged so far visible in the workdir (call it at checkpoints)."""
    self.events.sync()
    self.tb = self.events.tb
    if self.events.remote:
      self._write_jsonl()

  def close(self):
    self.events.close()
    if self.events.remote:
      self._write_jsonl()


class NullWriter:
  """What processes other than 0 of a multi-process run write: nothing."""

  def write_scalars(self, step, scalars):
    pass

  def records(self):
    return []

  def write_hparams(self, hparams, metrics):
    pass

  def sync(self):
    pass

  def close(self):
    pass


def read_records(workdir):
  """The records of WORKDIR/metrics.jsonl ([] when there is none); a line torn by a crash
  (not JSON) is dropped with a warning. A file cvjax cannot have written (a folder, bytes that
  are not UTF-8, a line that is JSON but not {"step": int, tag: number, ...}) is a UserError
  naming it: a resume checks this before it writes anything."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  fix = ('Move it aside (the run\'s checkpoints and events are intact) and re-run; nothing '
         'was written.')
  if path.is_dir():
    raise UserError(f'{path} is a folder; cvjax keeps the run\'s metrics there (one JSON line '
                    f'per logged step). {fix}')
  try:
    text = path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not the metrics cvjax writes: byte {e.start} '
                    f'({e.object[e.start:e.start + 1]!r}) is not UTF-8 text. {fix}') from None
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}. {fix}') from None
  records, torn = [], []
  for i, line in enumerate(text.splitlines()):
    try:
      record = json.loads(line)
    except ValueError:
      if line.strip():
        torn.append(i + 1)
      continue
    if not (isinstance(record, dict) and _is_int(record.get('step')) and all(
        _is_number(v) for v in record.values())):
      raise UserError(f'{path}, line {i + 1}: {line[:80]!r} is not a record cvjax writes '
                      f'({{"step": integer, "tag": number, ...}}). {fix}')
    records.append(record)
  if torn:
    logging.warning('%s: dropped unreadable line(s) %s (a line torn by a crash).', path, torn)
  return records


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def create(workdir, resume_step=0):
  """Process 0 logs; in a multi-process run the others would write the same lines again."""
  return MetricWriter(workdir, resume_step) if jax.process_index() == 0 else NullWriter()
