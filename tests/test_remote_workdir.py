"""A remote (gs://) workdir: every file a run, a sweep and a report touch goes through
etils.epath, tested on a local path and on a fake bucket.

The fake bucket is epath's own test backend (`epath.testing.mock_epath`) serving
gs://fake/... from a local folder; meanwhile a bare `open()` or `os` call on a gs://
string fails the test. Orbax writes gs:// itself (through tensorstore, which cannot be
faked here), so checkpoints alone go to a local folder in these tests.
"""

import builtins
import json
import os
import shutil

from etils import epath
from etils.epath import gpath
import numpy as np
import pytest

from conftest import tiny_config
from cvjax import checkpointing, metric_writer, sweep, train
from cvjax.tools import report


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://fake/... lives in tmp_path/bucket; returns (bucket folder, uploads by path)."""
  bucket = tmp_path / 'bucket'
  bucket.mkdir()
  writes = {}

  def local(path):
    path = os.fspath(path)
    return str(bucket / path[len('gs://fake/'):]) if path.startswith('gs://fake/') else path

  def open_(fn, path, mode):
    if 'w' in mode or 'a' in mode:
      writes[local(path)] = writes.get(local(path), 0) + 1
    return fn(local(path), mode)

  one = lambda fn, path, **kw: fn(local(path), **kw)
  two = lambda fn, path, dst, **kw: fn(local(path), local(dst), **kw)
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # epath's mock, not TF's GCS.
  real_open, real_makedirs = builtins.open, os.makedirs

  def no_bare_gs(fn):
    def guarded(file, *args, **kwargs):
      assert not str(file).startswith('gs:'), f'a gs:// path reached {fn.__name__}: {file}'
      return fn(file, *args, **kwargs)
    return guarded
  monkeypatch.setattr(builtins, 'open', no_bare_gs(real_open))
  monkeypatch.setattr(os, 'makedirs', no_bare_gs(real_makedirs))
  with epath.testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, glob=one, makedirs=one, mkdir=one,
      remove=one, rmtree=one, stat=one, walk=one, rename=two, replace=two, copy=two):
    yield bucket, writes


@pytest.fixture(params=['local', 'remote'])
def sweep_dir(request, tmp_path, monkeypatch):
  """(sweep dir as the user gives it, the folder where its files land)."""
  monkeypatch.chdir(tmp_path)  # A bare open('gs://...') would land here, as ./gs:/...
  if request.param == 'local':
    return str(tmp_path / 'sweep'), tmp_path / 'sweep'
  bucket, _ = request.getfixturevalue('fake_gcs')
  # Orbax writes gs:// through tensorstore: checkpoints stay local in this test.
  real = checkpointing.directory
  monkeypatch.setattr(checkpointing, 'directory', lambda w: real(
      str(w).replace('gs://fake/', str(tmp_path / 'orbax') + '/')))
  return 'gs://fake/sweep', bucket / 'sweep'


@pytest.mark.slow
def test_a_run_a_resume_and_a_report_write_through_epath(idx_dir, sweep_dir, tmp_path):
  workdir, where = sweep_dir
  run = f'{workdir}/resnet8'
  config = tiny_config(idx_dir)  # 12 steps, checkpoints and logs every 4.
  train.train_and_evaluate(config, run)
  assert sweep.is_finished(run)
  # Interrupted after the step-4 checkpoint: resume, each step logged once.
  ckpt = checkpointing.directory(run)
  for step in ('8', '12'):
    shutil.rmtree(os.fspath(ckpt / step))
  epath.Path(run, 'results.json').unlink()
  assert not sweep.is_finished(run)
  train.train_and_evaluate(config, run)

  files = {os.path.relpath(os.path.join(d, f), where / 'resnet8')
           for d, _, fs in os.walk(where / 'resnet8') for f in fs}
  assert {'config.json', 'metrics.jsonl', 'results.json', 'error_analysis/confusion.png',
          'error_analysis/mistakes.png', 'error_analysis/error_analysis.json'} <= files
  records = [json.loads(l) for l in open(where / 'resnet8' / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'train/loss' in r] == [4, 8, 12]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(where / 'resnet8'))
  events.Reload()
  assert [e.step for e in events.Scalars('train/loss')] == [4, 8, 12]
  assert 'error_analysis/confusion' in events.Tags()['images']

  report.write_report(workdir)
  assert {'leaderboard.md', 'README.md', 'figure6.png', 'table6.md'} <= set(
      os.listdir(where / 'report'))
  assert not os.path.exists(tmp_path / 'gs:')


def test_a_report_of_populations_reads_through_epath(sweep_dir):
  """Population members (members/<name>/) are found and read in a bucket too."""
  import test_report  # pylint: disable=g-import-not-at-top
  workdir, where = sweep_dir
  members = test_report.write_population(str(where / 'depth20'), 20, seeds=2)
  test_report.write_population(str(where / 'depth56'), 56, seeds=2, finished=False)
  report.write_report(workdir)
  rows = test_report.table(where / 'report' / 'table6.md')
  errors = [members[f'residualTrue_seed{s}']['test/error'] for s in range(2)]
  assert rows[('ResNet', '20')]['test error (%)'] == test_report.pm(errors)
  assert rows[('ResNet', '56')]['steps'] == '(unfinished)'


def test_remote_events_are_uploaded_once_each(fake_gcs):
  """tensorboardX's own gs:// writer uploads the whole file at every flush; ours uploads
  each finished segment once, at sync."""
  bucket, writes = fake_gcs
  writer = metric_writer.MetricWriter('gs://fake/run')
  for step in range(1, 10):
    writer.write_scalars(step, {'train/loss': 1.0 / step})
    if step % 3 == 0:
      writer.sync()
  writer.close()
  event_files = [k for k in writes if 'tfevents' in k]
  assert len(event_files) == 4  # Three syncs and the close: a segment each.
  assert all(writes[k] == 1 for k in event_files)
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  values = [float(tensor_util.make_ndarray(v.tensor)) if v.HasField('tensor') else v.simple_value
            for k in event_files
            for e in event_file_loader.EventFileLoader(k).Load() for v in e.summary.value]
  np.testing.assert_allclose(sorted(values), sorted(1.0 / s for s in range(1, 10)),
                             rtol=1e-6)  # Each event once, none lost.
  assert not os.path.exists(writer.events._staging)  # pylint: disable=protected-access
  assert [json.loads(l)['step'] for l in open(bucket / 'run' / 'metrics.jsonl')] == list(
      range(1, 10))


@pytest.mark.parametrize('remote', [False, True])
def test_a_resume_in_the_same_second_keeps_each_step_once(remote, fake_gcs, tmp_path, monkeypatch):
  """tensorboardX names event files by the second: a resume within it must still sort after
  the interrupted run's files (else TensorBoard keeps the purged steps) and not replace them."""
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(event_file_writer.time, 'time', lambda: 1796175458.5)
  run, where = ('gs://fake/run', fake_gcs[0] / 'run') if remote else (tmp_path / 'run',) * 2
  writer = metric_writer.MetricWriter(run)
  for step in (4, 8, 12):
    writer.write_scalars(step, {'train/loss': 1.0 / step})
    writer.sync()
  writer.close()
  writer = metric_writer.MetricWriter(run, resume_step=4)  # Killed after the step-4 checkpoint.
  for step in (8, 12):
    writer.write_scalars(step, {'train/loss': 2.0 / step})
    writer.sync()
  writer.close()
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(where))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [
      (4, 0.25), (8, 0.25), (12, pytest.approx(1 / 6))]
