"""Runs that survive: preemption, bad checkpoints, non-finite steps, a second run on the
workdir, bad config files and bad data. Each failure-mode row of docs/reliability.md names its test here."""

import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT, tiny_config
from cvjax import experiment, jit_steps, run_lock, steps, train
from cvjax.errors import UserError


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def run_main(workdir, *overrides, config='configs/resnet.py:resnet8', **kw):
  return subprocess.run(
      [sys.executable, '-m', 'cvjax.main', f'--config={config}', f'--workdir={workdir}',
       *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize('field,value', [
    ('log_every_steps', 0), ('keep_checkpoints', 0), ('checkpoint_every_steps', -1),
    ('eval_every_steps', -2), ('num_steps', -5), ('grad_norm_every_steps', -1),
])
def test_bad_config_values_are_refused_before_anything_is_written(idx_dir, tmp_path, field,
                                                                  value):
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match=f'train.{field}={value}'):
    train.train_and_evaluate(tiny_config(idx_dir, **{f'train.{field}': value}), str(workdir))
  assert not workdir.exists()


CONFIG_FILES = {
    'syntax.py': ('def get_config(:\n', r'syntax.py, line 1: SyntaxError'),
    'name.py': ('def get_config():\n  return foo\n', r"name.py, line 2 .*NameError: name 'foo'"),
    'imports.py': ('import no_such_module\n', r"imports.py, line 1 .*No module named"),
    'raises.py': ('def get_config(arg=None):\n  raise ValueError("no " + str(arg))\n',
                  r'raises.py, line 2: ValueError: no None'),
    'empty.py': ('X = 1\n', r'empty.py has no get_config\(\)'),
    'none.py': ('def get_config(arg=None):\n  return None\n', r'none.py: get_config\(\) returned '
                'None'),
    'dict.py': ('def get_config(arg=None):\n  return {}\n', r'dict.py: get_config\(\) returned '
                'dict'),
    'exits.py': ('import sys\ndef get_config(arg=None):\n  sys.exit(3)\n',
                 r'exits.py called sys.exit\(3\)'),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CONFIG_FILES))
def test_config_file_that_fails_to_load_names_file_and_line(tmp_path, name):
  text, message = CONFIG_FILES[name]
  (tmp_path / name).write_text(text)
  out = run_main(tmp_path / 'run', config=str(tmp_path / name))
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert re.search('cvjax: error: config file .*' + message, out.stderr), out.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.parametrize('argv,message', [
    (['--config={none}', '--workdir={run}', '--config.seed=3'],
     r'none.py: get_config\(\) returned None, expected an ml_collections.ConfigDict'),
    (['--config={dict}', '--workdir={run}', '--config.seed=3'],
     r'dict.py: get_config\(\) returned dict, expected'),
    (['--config=configs/resnet.py:resnet8'], r'pass --workdir=DIR, the folder the run writes'),
    (['--config=configs/resnet.py:resnet8', '--config.seed=2'], r'pass --workdir=DIR'),
    (['--config={none}'], r'pass --workdir=DIR'),
    (['--workdir={run}'], r'pass --config=FILE.py\[:arg\], the config file of the run'),
])
def test_a_missing_flag_or_a_config_that_is_none_with_overrides_is_named(tmp_path, argv,
                                                                         message):
  (tmp_path / 'none.py').write_text(CONFIG_FILES['none.py'][0])
  (tmp_path / 'dict.py').write_text(CONFIG_FILES['dict.py'][0])
  argv = [a.format(none=tmp_path / 'none.py', dict=tmp_path / 'dict.py', run=tmp_path / 'run')
          for a in argv]
  out = subprocess.run([sys.executable, '-m', 'cvjax.main', *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert re.search('cvjax: error: (config file .*)?' + message, out.stderr), out.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.parametrize('command', [['cvjax.main'],
                                     ['cvjax.import_weights', '--model=resnet18',
                                      '--weights=w.pth']])
def test_ctrl_c_while_the_config_file_loads_is_one_line_and_exit_75(tmp_path, command):
  loading = tmp_path / 'loading'
  (tmp_path / 'slow.py').write_text(
      f'import time\ndef get_config(arg=None):\n  open({str(loading)!r}, "w").close()\n'
      '  time.sleep(120)\n')
  proc = subprocess.Popen([sys.executable, '-m', *command, f'--config={tmp_path / "slow.py"}',
                           f'--workdir={tmp_path / "run"}'], cwd=ROOT, text=True,
                          stderr=subprocess.PIPE, start_new_session=True)
  import time  # pylint: disable=g-import-not-at-top
  try:
    for _ in range(600):  # Until the config file is loading.
      if loading.exists() or proc.poll() is not None:
        break
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the process group.
    err = proc.communicate(timeout=60)[1]
  finally:
    proc.kill()
    proc.wait()
  assert loading.exists(), err[-2000:]
  assert proc.returncode == 75 and 'Traceback' not in err, err[-2000:]
  assert re.search(r'cvjax: stopped by SIGINT while (no training step was running; nothing was '
                   r'lost|starting; nothing was written yet)', err), err[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field,value,message', [
    ('optimizer.learning_rate', -0.1, 'expected a positive number'),
    ('optimizer.learning_rate', float('nan'), 'expected a positive number'),
    ('optimizer.weight_decay', -1e-4, 'expected a number >= 0'),
    ('optimizer.momentum', -0.5, r'expected a number in \[0, 1\)'),
    ('optimizer.momentum', 1.0, r'expected a number in \[0, 1\)'),
    ('schedule.warmup_steps', -3, 'expected an integer >= 0'),
    ('schedule.boundaries', (0.5, 1.5), r'expected fractions of the run in \[0, 1\]'),
    ('schedule.boundaries', ('abc',), r'expected fractions of the run in \[0, 1\]'),
    ('schedule.decay_factor', 0.0, 'expected a positive factor'),
    ('input.crop_padding', -1, r'expected an integer in \[0, 256\]'),
    ('input.image_size', 10 ** 6, r'expected an integer in \[0, 4096\]'),
    ('seed', 2 ** 70, r'expected an integer in \[0, 2147483647\]'),
    ('seed', -1, r'expected an integer in \[0, 2147483647\]'),
])
def test_values_out_of_range_are_refused_before_anything_is_written(idx_dir, tmp_path, field,
                                                                   value, message):
  config = tiny_config(idx_dir)
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match=f'^{re.escape(field)}=.*{message}'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_an_extra_argument_is_one_paragraph_and_exit_2(tmp_path):
  out = run_main(tmp_path / 'run', 'extra')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert 'cvjax: error: unexpected argument(s) extra' in out.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  lock = workdir / run_lock.LOCK_FILE
  # A live holder: this very process, as if another run were going on.
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'started': run_lock._start_time(os.getpid()), 'since': 'earlier'}
  lock.write_text(json.dumps(holder))
  config = tiny_config(idx_dir, **{'train.num_steps': 2})
  with pytest.raises(UserError, match=f'in use by another run \\(pid {os.getpid()}'):
    train.train_and_evaluate(config, str(workdir))
  assert json.loads(lock.read_text()) == holder and not (workdir / 'checkpoints').exists()
  # The same pid started at another time (a reused pid) and a pid that is gone: stale.
  for stale in ({**holder, 'started': '1'}, {**holder, 'pid': dead_pid()}):
    lock.write_text(json.dumps(stale))
    train.train_and_evaluate(config, str(workdir))
    assert not lock.exists()  # Released at the end.
  assert os.listdir(workdir / 'checkpoints') == ['2']


def test_an_unreadable_lock_is_waited_for_while_fresh_then_taken_over(tmp_path):
  """A lock that cannot be parsed yet is a run writing it right now: wait, and read it again.
  Still unreadable at FRESH_SECONDS old, it is torn (its writer died) and is taken over."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  lock = tmp_path / run_lock.LOCK_FILE
  live = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': run_lock._start_time(os.getpid()), 'since': 'now'}
  # Being written: the whole JSON arrives half a second later.
  lock.write_text('{"host": "')
  writer = threading.Timer(0.5, lambda: lock.write_text(json.dumps(live)))
  writer.start()
  with pytest.raises(UserError, match=f'in use by another run \\(pid {os.getpid()}'):
    run_lock.acquire(str(tmp_path))
  writer.join()
  # Torn, and a JSON value that is no lock: taken over once FRESH_SECONDS old, not refused.
  for text in ('{"host": "', '5', '[]', ''):
    lock.write_text(text)
    made = time.time() - run_lock.FRESH_SECONDS + 0.3
    os.utime(lock, (made, made))
    assert run_lock.acquire(str(tmp_path)) == str(lock)
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    assert time.time() - made >= run_lock.FRESH_SECONDS  # It waited until the lock was old.
    run_lock.release(str(lock))
    assert not lock.exists()


def dead_pid():
  p = subprocess.Popen(['true'])
  p.wait()
  return p.pid


def test_unwritable_workdir_is_a_clear_error(idx_dir, tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(UserError, match='cannot create --workdir=.*file/run: Not a directory'):
    train.train_and_evaluate(tiny_config(idx_dir), str(tmp_path / 'file' / 'run'))
  # Said before the data loads and the steps compile (minutes on ImageNet), not after.
  with pytest.raises(UserError, match='cannot create --workdir=.*file/run: Not a directory'):
    train.train_and_evaluate(tiny_config(str(tmp_path / 'no_data')),
                             str(tmp_path / 'file' / 'run'))


# --- Bad data ----------------------------------------------------------------------------

def test_idx_label_outside_the_classes_is_an_error(tmp_path):
  from conftest import bars, write_idx  # pylint: disable=g-import-not-at-top
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  images, labels = bars(30)
  labels[7] = 200
  write_idx(tmp_path, images, labels, 'train')
  write_idx(tmp_path, *bars(10, seed=1), 't10k')
  with pytest.raises(UserError, match='train example 7 has label 200, but only 1[01] distinct'):
    memory.load_local(str(tmp_path))
  labels[7] = 10  # Eleven classes, where the name says ten.
  write_idx(tmp_path, images, labels, 'train')
  with pytest.raises(UserError, match="label 10, but dataset.name='mnist' has 10 classes"):
    memory.load_local(str(tmp_path), 'mnist')


def _png(value, size=(6, 5)):
  buf = io.BytesIO()
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def test_empty_class_folder_and_unreadable_images_are_errors(tmp_path):
  import tarfile  # pylint: disable=g-import-not-at-top
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  for split in ('train', 'test'):
    for c in ('ant', 'bee'):
      (root / split / c).mkdir(parents=True)
      (root / split / c / '0.png').write_bytes(_png(1))
  (root / 'train' / 'cat').mkdir()  # Empty: would drop a class and shift the labels.
  with tarfile.open(tmp_path / 'data.tar.gz', 'w:gz') as tar:
    tar.add(root, arcname='data')
  for path in (root, tmp_path / 'data.tar.gz'):
    with pytest.raises(UserError, match='class folder.* train/cat hold no images'):
      memory.load_local(str(path))
  (root / 'train' / 'cat').rmdir()
  bad = root / 'train' / 'ant' / '1.png'
  bad.write_bytes(b'not an image at all')
  with pytest.raises(UserError, match=r'1.png \(19 bytes\): its 19 bytes are not in an image format') as e:
    memory.load_local(str(root))
  noise = np.random.default_rng(0).integers(0, 255, (6, 5, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, 'PNG')
  bad.write_bytes(buf.getvalue()[:80])  # Truncated.
  with pytest.raises(UserError, match=r'1.png \(80 bytes\): .*truncated') as e:
    memory.load_local(str(root))
  assert 'BytesIO' not in str(e.value)


def test_dataset_name_that_contradicts_the_path_is_reported(idx_dir, tmp_path, caplog):
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir)  # 12x12 grey images in 10 classes.
  config.dataset.name = 'cifar10'
  memory.load(config.dataset)
  assert "dataset.name='cifar10' disagrees" in caplog.text and '(12, 12, 1)' in caplog.text
  caplog.clear()
  os.symlink(idx_dir, tmp_path / 'fashion-mnist')
  config.dataset.update(name='mnist', path=str(tmp_path / 'fashion-mnist'))
  memory.load(config.dataset)
  assert 'the path names fashion_mnist' in caplog.text
  caplog.clear()
  config.dataset.name = ''
  memory.load(config.dataset)
  assert 'disagrees' not in caplog.text


@pytest.mark.slow
def test_checkpoint_of_another_dataset_is_refused(idx_dir, tmp_path):
  from conftest import bars, write_idx  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'other'  # Same shapes and classes, other images and labels.
  write_idx(other, *bars(96, seed=5), 'train')
  write_idx(other, *bars(40, seed=6), 't10k')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(idx_dir, **{'train.num_steps': 2}), workdir)
  with pytest.raises(UserError, match='different model or dataset.*labels_sha256'):
    train.train_and_evaluate(tiny_config(str(other), **{'train.num_steps': 4}), workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']


# --- Preemption: real signals to real `cvjax.main` processes ------------------------------

# 24 steps, checkpoints every 4 (all kept), evaluation every 6, logs every 4.
LONG = {'train.num_steps': 24, 'train.keep_checkpoints': 6}


@pytest.fixture(scope='module')
def reference(idx_dir, tmp_path_factory):
  """An uninterrupted run of tiny_config(**LONG): (final state, workdir)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state, _ = train.train_and_evaluate(tiny_config(idx_dir, **LONG), workdir)
  return state, workdir


def assert_same_state(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               (a.params, a.model_state), (b.params, b.model_state))
WRAPPER = '''
import os, signal, sys
from absl import app
from cvjax import checkpointing, main, train
moment, sig = sys.argv.pop(1), getattr(signal, sys.argv.pop(1))
owner, name = (train, 'evaluate') if moment == 'eval' else (checkpointing, 'save')
original = getattr(owner, name)

calls = []


def wrapped(*args, **kwargs):  # Signals the first call only.
  calls.append(1)
  if moment != 'after_save' and len(calls) == 1:  # Inside the call: mid-eval, mid-save.
    os.kill(os.getpid(), sig)
  out = original(*args, **kwargs)
  if moment == 'after_save' and len(calls) == 1:  # The asynchronous write is under way.
    os.kill(os.getpid(), sig)
  return out

setattr(owner, name, wrapped)
app.run(main.main, flags_parser=main.parse_flags)
'''


def main_args(idx_dir, workdir):
  return [f'--workdir={workdir}', '--config=configs/resnet.py:resnet8',
          *(f'--config.{k}={v}' for k, v in {**TINY, **LONG, 'dataset.path': idx_dir}.items())]


TINY = {'dataset.name': '', 'input.crop_padding': 2, 'train.batch_size': 16, 'train.eval_batch_size': 16,
        'train.num_steps': 12, 'train.log_every_steps': 4, 'train.eval_every_steps': 6,
        'train.checkpoint_every_steps': 4}  # tiny_config() as flags.


def interrupted(args, moment=None, sig='SIGTERM'):
  """Runs cvjax.main; with `moment`, it signals itself at that point of its first
  evaluation or checkpoint save."""
  cmd = [sys.executable, '-c', WRAPPER, moment, sig] if moment else [sys.executable, '-m',
                                                                       'cvjax.main']
  return subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def latest_checkpoint(workdir):
  return max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@pytest.mark.slow
def test_signals_at_any_moment_resume_to_the_uninterrupted_parameters(idx_dir, tmp_path,
                                                                     reference):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir, **LONG)
  workdir = tmp_path / 'run'
  args = main_args(idx_dir, workdir)

  # SIGTERM from outside, mid-training: right after the first step.
  proc = subprocess.Popen([sys.executable, '-m', 'cvjax.main', *args], cwd=ROOT, text=True,
                          stderr=subprocess.PIPE)
  log = []
  for line in proc.stderr:
    log.append(line)
    if 'First step' in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait() == 75, ''.join(log)[-3000:]
  stopped = latest_checkpoint(workdir)
  assert 1 <= stopped < 24 and 'Re-run the same command to resume' in ''.join(log)
  assert not (workdir / run_lock.LOCK_FILE).exists()

  # SIGINT during an evaluation: the evaluation ends, then the checkpoint at that step.
  out = interrupted(args, 'eval', 'SIGINT')
  assert out.returncode == 75, out.stderr[-3000:]
  at_eval = latest_checkpoint(workdir)
  assert at_eval % 6 == 0 and at_eval > stopped
  assert f'Resuming from the checkpoint at step {stopped}.' in out.stderr

  # SIGTERM during a checkpoint save: that save completes, the next step is saved too.
  out = interrupted(args, 'save', 'SIGTERM')
  assert out.returncode == 75, out.stderr[-3000:]
  at_save = latest_checkpoint(workdir)
  assert at_save == (at_eval // 4 + 1) * 4 + 1, (at_eval, at_save)

  # SIGKILL while the asynchronous save is writing: no handler runs; that step may be lost.
  out = interrupted(args, 'after_save', 'SIGKILL')
  assert out.returncode == -9, out.stderr[-3000:]
  assert (workdir / run_lock.LOCK_FILE).exists()  # Stale now: the next run takes it over.

  resumed, _ = train.train_and_evaluate(config, str(workdir))
  assert int(resumed.step) == 24
  assert_same_state(reference[0], resumed)
  # Each logged step once, none missing: metrics.jsonl and TensorBoard alike.
  records = read_jsonl(workdir)
  assert [r['step'] for r in records if 'train/loss' in r] == [4, 8, 12, 16, 20, 24]
  assert [r['step'] for r in records if 'test/loss' in r] == [6, 12, 18, 24]
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  assert [e.step for e in events.Scalars('train/loss')] == [4, 8, 12, 16, 20, 24]
  assert [e.step for e in events.Scalars('test/error')] == [6, 12, 18, 24]


MULTI_PROCESS = '''
import os, signal, sys, time
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from cvjax import preemption
with preemption.watch() as stop_requested:
  for step in range(1, 100000):
    time.sleep(0.01)  # A training step.
    if step == 20 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches one process only.
    stop = stop_requested(step)
    if stop:
      print('STOPPED', step, stop, flush=True)
      break
'''


@pytest.mark.slow
def test_processes_of_a_multi_process_run_stop_after_the_same_step():
  with socket.socket() as sock:  # A free port for the coordinator.
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, '-c', MULTI_PROCESS, f'localhost:{port}', str(i)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  stops = [re.findall(r'STOPPED (\d+) (\w+)', out) for out, _ in outs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0][0][0] == stops[1][0][0], stops
  assert int(stops[0][0][0]) > 20


# --- Non-finite steps ----------------------------------------------------------------------

# A constant learning rate of 30 sends tiny ResNet-8 to nan at step 14 (between the
# checkpoints at 12 and 16, logs every 100 steps): the check must not wait for a log.
# A learning rate scaled by 1e38 after step 17 of 24: the run turns non-finite within a step or
# two of that, on every CPU and convolution backend, and the checkpoints before it hold a sanely
# trained state. (A large constant rate diverged at a step that moved with the convolution
# kernels' rounding, sometimes onto a checkpoint step.)
DIVERGES = {'optimizer.learning_rate': 0.1, 'schedule.name': 'piecewise',
            'schedule.boundaries': (17 / 24,), 'schedule.decay_factor': 1e38,
            'train.num_steps': 24, 'train.log_every_steps': 100}


@pytest.mark.slow
def test_nonfinite_state_is_never_saved_and_the_run_stops_at_its_true_step(idx_dir, tmp_path):
  # Logging every step, the host sees every loss: the first non-finite step, found directly.
  with pytest.raises(UserError, match=r'non-finite \(nan or inf\) at step (\d+)') as every:
    train.train_and_evaluate(tiny_config(idx_dir, **{**DIVERGES, 'train.log_every_steps': 1}),
                             str(tmp_path / 'every'))
  first = int(re.search(r'at step (\d+)', str(every.value)).group(1))
  assert first % 4, first  # Between checkpoints, so "the newest good one" means something.

  workdir = tmp_path / 'run'
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(tiny_config(idx_dir, **DIVERGES), str(workdir))
  last_good = first // 4 * 4
  # Each failure says what was seen (a flake in a full suite once went unexplained).
  listing = sorted(os.listdir(workdir / 'checkpoints'))
  assert f'at step {first},' in str(e.value), (first, str(e.value))
  assert f'The newest checkpoint (step {last_good}) is good' in str(e.value), (first, str(e.value))
  assert all(d.isdigit() for d in listing), listing  # No half-written checkpoint.
  assert sorted(int(d) for d in listing)[-1] == last_good, (first, listing)
  # After a resume the message still names the true step.
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(tiny_config(idx_dir, **DIVERGES), str(workdir))
  assert f'at step {first},' in str(e.value), (first, str(e.value))
  # A sane learning rate resumes from the last good checkpoint and finishes.
  state, _ = train.train_and_evaluate(
      tiny_config(idx_dir, **{**DIVERGES, 'schedule.name': 'constant'}), str(workdir))
  assert int(state.step) == 24 and checkpointing_finite(state), int(state.step)
  steps = [r['step'] for r in read_jsonl(workdir)]
  assert steps == sorted(steps), steps


def checkpointing_finite(state):
  from cvjax import checkpointing  # pylint: disable=g-import-not-at-top
  return bool(checkpointing.all_finite(state))


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_such_updates(idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  state, _ = train.train_and_evaluate(
      tiny_config(idx_dir, **{**DIVERGES, 'train.skip_nonfinite': True,
                              'train.log_every_steps': 4}), str(workdir))
  assert int(state.step) == 24 and checkpointing_finite(state)
  skipped = [r['train/skipped_nonfinite'] for r in read_jsonl(workdir)
             if 'train/skipped_nonfinite' in r]
  assert len(skipped) == 6 and skipped[:3] == [0, 0, 0] and sum(skipped) > 0, skipped


@pytest.mark.slow
def test_skipped_update_leaves_the_state_unchanged(idx_dir):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir, **{'train.skip_nonfinite': True})
  s = experiment.build(config)
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  state = steps.init_state(s.init, jax.random.key(0), replicated)
  state = state.replace(params={**state.params, 'head': {
      **state.params['head'], 'bias': state.params['head']['bias'].at[3].set(jnp.nan)}})
  data = jax.device_put(s.input.train_data, replicated)
  before = jax.device_get(state)
  step = jit_steps.jit_train_step(s.model, s.tx, config, s.mesh, s.input.make_train_batch)
  after, metrics = step(state, data, {'indices': jnp.arange(16)}, jax.random.key(1))
  after = jax.device_get(after)
  assert int(after.step) == 1 and int(metrics['nonfinite']) == 1
  assert int(metrics['first_nonfinite']) == 1 and float(metrics['count']) == 0
  jax.tree.map(np.testing.assert_array_equal, (before.params, before.opt_state),
               (after.params, after.opt_state))


# --- Checkpoints that fail to restore --------------------------------------------------------

def corrupt(checkpoint, kind):
  """Damages one checkpoint folder the way disks, copies and killed writers do."""
  state = os.path.join(checkpoint, 'state')
  if kind in ('truncated', 'zeroed'):
    data = glob.glob(os.path.join(state, 'ocdbt.process_0', 'd', '*'))
    biggest = max(data, key=os.path.getsize)  # The one holding the arrays.
    size = os.path.getsize(biggest)
    with open(biggest, 'r+b') as f:
      if kind == 'truncated':
        f.truncate(size // 3)
      else:
        f.write(bytes(size))
  elif kind == 'garbage _METADATA':
    with open(os.path.join(state, '_METADATA'), 'w') as f:
      f.write('{"tree_metadata": [garbage')
  elif kind == 'no state/':
    shutil.rmtree(state)


@pytest.mark.slow
def test_checkpoints_that_fail_to_restore_are_set_aside_and_the_run_falls_back(
    idx_dir, tmp_path, reference, caplog):
  from cvjax import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  shutil.copytree(reference[1], workdir)
  os.remove(workdir / 'results.json')
  # Step 20 holds nan values, as an older cvjax could save them.
  mngr = checkpointing.manager(str(tmp_path / 'nan'), 6)
  s = experiment.build(tiny_config(idx_dir, **LONG))
  nan_state = reference[0].replace(params=jax.tree.map(lambda x: x * np.nan, reference[0].params))
  checkpointing.save(mngr, 20, nan_state, s.fingerprint)
  mngr.close()
  shutil.rmtree(workdir / 'checkpoints' / '20')
  shutil.move(tmp_path / 'nan' / 'checkpoints' / '20', workdir / 'checkpoints' / '20')
  damage = {24: 'truncated', 16: 'garbage _METADATA', 12: 'zeroed', 8: 'no state/'}
  for step, kind in damage.items():
    corrupt(str(workdir / 'checkpoints' / str(step)), kind)
  why = {24: 'OUT_OF_RANGE', 20: 'nan or inf', 16: 'JSONDecodeError', 12: 'ZSTD', 8: 'state'}

  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 25, "train/lo')  # A line torn by a crash.
  caplog.set_level('INFO', logger='absl')
  resumed, _ = train.train_and_evaluate(tiny_config(idx_dir, **LONG), str(workdir))
  assert 'Resuming from the checkpoint at step 4.' in caplog.text
  assert_same_state(reference[0], resumed)
  for step, reason in why.items():  # Each reported with its step and cause, and kept.
    assert re.search(f'checkpoint at step {step} cannot be restored \\(.*{reason}', caplog.text)
    kept = workdir / 'bad_checkpoints' / str(step)
    assert reason in (kept / 'WHY.txt').read_text() and (kept / '_CHECKPOINT_METADATA').exists()
  assert sorted(map(int, os.listdir(workdir / 'checkpoints'))) == [4, 8, 12, 16, 20, 24]
  # The torn line is dropped with a warning; the resumed steps are logged once each.
  assert re.search(r'metrics.jsonl: dropped unreadable line\(s\) \[\d+\]', caplog.text)
  steps = [r['step'] for r in read_jsonl(workdir)]
  assert steps == [4, 6, 8, 12, 12, 16, 18, 20, 24, 24]


def test_a_sweep_stops_when_its_trial_was_stopped_by_a_signal(tmp_path, monkeypatch):
  from cvjax import sweep  # pylint: disable=g-import-not-at-top
  (tmp_path / 'two.py').write_text('def get_trials(arg=None):\n  return [("a", {}), ("b", {})]\n')
  ran = []

  def trial(config, workdir, name, overrides, extra):  # Trial "a" is preempted.
    ran.append(name)
    return [sys.executable, '-c', f'import sys; sys.exit({75 if name == "a" else 0})']
  monkeypatch.setattr(sweep, 'trial_command', trial)
  status = sweep.run_sweep('configs/resnet.py', str(tmp_path / 'two.py'), str(tmp_path / 'w'))
  assert status == {'a': 'stopped'} and ran == ['a']


# --- A config that does not fit the checkpoint: refused, nothing moved -----------------------

def snapshot(workdir):
  """Every file under `workdir` with its bytes (TensorBoard events aside: readers append
  images there)."""
  out = {}
  for folder, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(folder, f)
      if 'events.out' not in f:
        with open(path, 'rb') as fh:
          out[os.path.relpath(path, workdir)] = fh.read()
  return out


def run_evaluate(workdir, *args):
  return subprocess.run([sys.executable, '-m', 'cvjax.evaluate', f'--workdir={workdir}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_config_that_does_not_fit_the_checkpoint_is_refused_and_nothing_moves(idx_dir,
                                                                               tmp_path):
  workdir = tmp_path / 'run'
  common = [f'--config.{k}={v}' for k, v in {**TINY, 'dataset.path': idx_dir,
                                              'train.num_steps': 4,
                                              'train.checkpoint_every_steps': 2}.items()]
  assert run_main(workdir, *common).returncode == 0
  before = snapshot(workdir)
  # momentum 0 has no momentum buffers: the optimizer state has other arrays.
  out = run_main(workdir, *common, '--config.optimizer.momentum=0')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert re.search(r'checkpoint at step 4 does not fit this config \(optimizer.momentum was '
                   r'0.9, now 0.0\).*trace', out.stderr), out.stderr[-3000:]
  assert out.stderr.count('cvjax: error:') == 1
  assert snapshot(workdir) == before and not (workdir / 'bad_checkpoints').exists()
  # An evaluation under that config is refused the same way, and moves nothing either.
  config = tmp_path / 'config.py'
  config.write_text('import json\nimport ml_collections\n\ndef get_config():\n'
                    f'  c = ml_collections.ConfigDict(json.load(open({str(workdir / "config.json")!r})))\n'
                    '  c.optimizer.momentum = 0.0\n  return c\n')
  out = run_evaluate(workdir, f'--config={config}')
  assert out.returncode == 2 and 'does not fit this config' in out.stderr, out.stderr[-3000:]
  assert snapshot(workdir) == before
  # More steps at a lower learning rate keep the layout: the run resumes, saying what changed.
  out = run_main(workdir, *common, '--config.train.num_steps=6',
                 '--config.optimizer.learning_rate=0.05')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 4.' in out.stderr
  assert re.search(r'changed settings: num_steps was 4, now 6; optimizer.learning_rate was 0.1, '
                   r'now 0.05', out.stderr), out.stderr[-3000:]
  assert json.load(open(workdir / 'results.json'))['step'] == 6


@pytest.mark.slow
def test_an_evaluation_skips_a_damaged_checkpoint_without_moving_it(idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  common = [f'--config.{k}={v}' for k, v in {**TINY, 'dataset.path': idx_dir,
                                              'train.num_steps': 4,
                                              'train.checkpoint_every_steps': 2}.items()]
  assert run_main(workdir, *common).returncode == 0
  corrupt(str(workdir / 'checkpoints' / '4'), 'truncated')
  before = snapshot(workdir)
  out = run_evaluate(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'checkpoint at step 4 cannot be restored' in out.stderr and 'left it as it is' in \
      out.stderr
  assert out.stdout.startswith('step 2:'), out.stdout
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if not k.startswith('error_analysis')} == \
      {k: v for k, v in before.items() if not k.startswith('error_analysis')}
  assert not (workdir / 'bad_checkpoints').exists()


# --- Streaming input: the in-memory loader's checks, and a bad image mid-run -----------------

def test_streamed_image_folder_refuses_empty_classes_and_files(tmp_path):
  from cvjax.data import streaming  # pylint: disable=g-import-not-at-top
  from test_streaming import write_jpeg_folder  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  write_jpeg_folder(root)
  (root / 'train' / 'n00').mkdir()  # Sorts first: every label would shift by one.
  with pytest.raises(UserError, match=r'class folder .*train/n00 holds no images.*shifted'):
    streaming.image_folder(str(root))
  (root / 'train' / 'n00').rmdir()
  (root / 'val' / 'n01' / 'n01_0.JPEG').write_bytes(b'')
  with pytest.raises(UserError, match=r'val/n01/n01_0.JPEG is empty \(0 bytes\)'):
    streaming.image_folder(str(root))
  os.remove(root / 'val' / 'n01' / 'n01_0.JPEG')
  splits = streaming.image_folder(str(root))
  os.remove(root / 'train' / 'n01' / 'n01_1.JPEG')  # Gone after the listing.
  with pytest.raises(UserError, match=r'cannot read image .*n01_1.JPEG: No such file'):
    splits.train[1]
  with pytest.raises(UserError) as e:
    streaming.decode({'image': b'\x89PNG\r\n\x1a\n' + bytes(30), 'where': 'x/a.png'})
  assert 'x/a.png (38 bytes)' in str(e.value) and 'BytesIO' not in str(e.value)


def streaming_args(data, workdir, **overrides):
  flags = {'dataset.pipeline': 'streaming', 'dataset.name': '', 'dataset.path': data,
           'input.image_size': 32, 'input.normalization': 'imagenet', 'input.crop_padding': 0,
           'train.batch_size': 8, 'train.eval_batch_size': 4, 'train.num_steps': 12,
           'train.log_every_steps': 2, 'train.checkpoint_every_steps': 2, 'input.workers': 1,
           **overrides}
  return [f'--workdir={workdir}', '--config=configs/resnet.py:resnet8',
          *(f'--config.{k}={v}' for k, v in flags.items())]


@pytest.mark.slow
def test_a_bad_streamed_image_ends_the_run_with_one_paragraph_and_whole_checkpoints(tmp_path):
  from test_streaming import write_jpeg_folder  # pylint: disable=g-import-not-at-top
  data = write_jpeg_folder(tmp_path / 'data', train_per_class=8)
  bad = tmp_path / 'data' / 'train' / 'n02' / 'n02_3.JPEG'
  bad.write_bytes(bad.read_bytes()[:100])  # Truncated: decodes only when drawn.
  workdir = tmp_path / 'run'
  out = interrupted(streaming_args(data, workdir))
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert out.stderr.count('cvjax: error:') == 1
  assert re.search(r'cvjax: error: cannot decode image .*n02_3.JPEG \(100 bytes\)', out.stderr)
  assert 'BytesIO' not in out.stderr
  last = [l for l in out.stderr.splitlines() if l.startswith(('cvjax', 'E', 'W'))][-1]
  assert last.endswith('a re-run resumes from the last checkpoint.'), out.stderr[-3000:]
  saved = os.listdir(workdir / 'checkpoints')
  assert saved and all(d.isdigit() for d in saved), saved  # None left half-written.


STARTUP_SIGNAL = '''
import os, signal, sys
from absl import app
from cvjax import data, main
original = data.make_input

def loading(*args, **kwargs):  # SIGTERM while the data loads.
  os.kill(os.getpid(), signal.SIGTERM)
  return original(*args, **kwargs)

data.make_input = loading
app.run(main.main, flags_parser=main.parse_flags)
'''


@pytest.mark.slow
def test_sigterm_during_start_up_ends_with_a_message_and_exit_75(idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, '-c', STARTUP_SIGNAL, *main_args(idx_dir, workdir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 75 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert 'cvjax: stopped by SIGTERM during start-up, before the first step; there was nothing ' \
         'to save yet. Re-run the same command to start:' in out.stderr
  assert not (workdir / 'checkpoints').exists() and not (workdir / run_lock.LOCK_FILE).exists()


@pytest.mark.slow
def test_sigterm_while_jax_is_imported_ends_with_a_message_and_exit_75(tmp_path):
  proc = subprocess.Popen([sys.executable, '-m', 'cvjax.main', '--config=configs/resnet.py',
                           f'--workdir={tmp_path / "run"}'], cwd=ROOT, text=True,
                          stderr=subprocess.PIPE)
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(0.5)  # Importing JAX and the models takes seconds.
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == 75 and 'Traceback' not in err, err[-2000:]
  assert 'cvjax: stopped by SIGTERM while no training step was running; nothing was lost.' in err
  assert not (tmp_path / 'run').exists()


def test_workdir_entries_of_the_wrong_type_and_a_full_disk_are_one_paragraph(idx_dir, tmp_path):
  from cvjax import checkpointing, errors  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  (workdir / run_lock.LOCK_FILE).mkdir(parents=True)
  with pytest.raises(UserError, match=r'lock is not a file'):
    run_lock.acquire(str(workdir))
  (workdir / run_lock.LOCK_FILE).rmdir()
  (workdir / checkpointing.BAD_CHECKPOINTS).write_text('')
  (workdir / 'checkpoints' / '4').mkdir(parents=True)  # Damaged: nothing in it.
  with pytest.raises(UserError, match=r'bad_checkpoints, where damaged checkpoints are kept, '
                     'is not a folder'):
    checkpointing.set_aside(checkpointing.manager(str(workdir), 1), 4, ValueError('empty'))
  assert (workdir / 'checkpoints' / '4').is_dir()
  # orbax's report of a full disk, and a plain one.
  orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "params.a/0" in OCDBT database at local '
                     f'file "{workdir}/checkpoints/10.orbax-checkpoint-tmp/state/ocdbt.process_0/"'
                     ': Failed to write 6036 bytes to file 7: No space left on device')
  assert errors.storage_error(RuntimeError('wrapped').with_traceback(None)) is None
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = orbax
  assert errors.storage_error(wrapped).startswith(
      f'cannot write the checkpoint at step 10 to {workdir}/checkpoints: no space left')
  full = OSError(28, os.strerror(28), str(workdir / 'metrics.jsonl'))
  assert errors.storage_error(full).startswith(f'cannot write {workdir}/metrics.jsonl: No space')


GRAIN_PARENT = '''
import os, sys, time
sys.path.insert(0, sys.argv[1])
from cvjax.data import streaming
import grain
ds = grain.MapDataset.range(10 ** 6).map(lambda i: i)
it = streaming._iterate(ds, workers=2, threads=1)
next(it)
print(' '.join(str(p) for p in sys.argv[2:]), flush=True)
time.sleep(600)
'''


def children_of(pid):
  """Pids of the live descendants of `pid`, from /proc."""
  parents = {}
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      if fields[0] != 'Z':
        parents[int(entry)] = int(fields[1])
    except (OSError, ValueError, IndexError):
      pass
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    kids = [c for c, pp in parents.items() if pp == p]
    found += kids
    todo += kids
  return found


def alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads /proc')
def test_grain_workers_die_with_their_parent(tmp_path):
  import time  # pylint: disable=g-import-not-at-top
  parent = subprocess.Popen([sys.executable, '-c', GRAIN_PARENT, ROOT], stdout=subprocess.PIPE,
                            text=True)
  try:
    parent.stdout.readline()  # The workers are up.
    children = children_of(parent.pid)  # 2 workers and multiprocessing's resource tracker.
    assert len(children) >= 2, children
  finally:
    parent.kill()  # kill -9: no handler, no atexit.
    parent.wait()
  deadline = time.time() + 30
  while time.time() < deadline and any(map(alive, children)):
    time.sleep(0.5)
  assert not [c for c in children if alive(c)]


# --- Sweeps: bad sweep files, trial names, and SIGTERM to the sweep ---------------------------

SWEEP_FILES = {
    'raises.py': ('def get_trials(arg=None):\n  raise ValueError("no")\n',
                  r'raises.py, line 2: ValueError: no'),
    'syntax.py': ('def get_trials(:\n', r'syntax.py, line 1: SyntaxError'),
    'missing.py': ('X = 1\n', r'missing.py has no get_trials\(\)'),
    'none.py': ('def get_trials(arg=None):\n  return None\n',
                r'get_trials\(\) returned NoneType'),
    'exits.py': ('import sys\nsys.exit(3)\n', r'exits.py, line 2: SystemExit: 3'),
    'absolute.py': ('def get_trials(arg=None):\n  return [("/abs/x", {})]\n',
                    r"trial name '/abs/x' is not a plain folder name"),
    'up.py': ('def get_trials(arg=None):\n  return [("..", {})]\n', r"trial name '..' is not"),
    'nested.py': ('def get_trials(arg=None):\n  return [("a/../../b", {})]\n', r"'a/../../b'"),
    'empty_name.py': ('def get_trials(arg=None):\n  return [("", {})]\n', r"trial name ''"),
    'flag.py': ('def get_trials(arg=None):\n  return [("-x", {})]\n', r"trial name '-x'"),
}


@pytest.mark.parametrize('name', sorted(SWEEP_FILES))
def test_bad_sweep_files_and_trial_names_are_refused_before_any_trial(tmp_path, name):
  from cvjax import sweep  # pylint: disable=g-import-not-at-top
  text, message = SWEEP_FILES[name]
  (tmp_path / name).write_text(text)
  with pytest.raises(UserError, match=message):
    sweep.run_sweep('configs/resnet.py', str(tmp_path / name), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_a_bad_sweep_file_is_one_paragraph_and_exit_2(tmp_path):
  (tmp_path / 'up.py').write_text(SWEEP_FILES['up.py'][0])
  out = subprocess.run([sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py',
                        f'--sweep={tmp_path / "up.py"}', f'--workdir={tmp_path / "w"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert out.stderr.startswith('cvjax.sweep: error: sweep file') and out.stderr.count('\n') == 1


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_trial_after_a_checkpoint(idx_dir, tmp_path):
  (tmp_path / 'two.py').write_text(
      'def get_trials(arg=None):\n  return [("a", {}), ("b", {})]\n')
  flags = {**TINY, **LONG, 'dataset.path': idx_dir}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py:resnet8',
       f'--sweep={tmp_path / "two.py"}', f'--workdir={tmp_path / "w"}',
       *(f'--config.{k}={v}' for k, v in flags.items())],
      cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  log = []
  for line in proc.stdout:
    log.append(line)
    if 'First step' in line:
      proc.send_signal(signal.SIGTERM)  # To the sweep's pid only.
  assert proc.wait() == 75, ''.join(log)[-3000:]
  text = ''.join(log)
  assert '[sweep] SIGTERM: passed on to the trial' in text
  assert 'cvjax: stopped by SIGTERM after step' in text and '[sweep] a: stopped' in text
  trial = tmp_path / 'w' / 'a'
  assert latest_checkpoint(trial) >= 1 and not (trial / run_lock.LOCK_FILE).exists()
  assert not (tmp_path / 'w' / 'b').exists()


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once_when_redone(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from cvjax import metric_writer  # pylint: disable=g-import-not-at-top
  # The killed run, then the one that starts over from step 0, most likely within the same
  # second (event files are named by the second they were opened, then a nanosecond suffix).
  for _ in range(2):
    writer = metric_writer.create(str(tmp_path), resume_step=0)
    for step in (4, 8):
      writer.write_scalars(step, {'train/loss': 1.0 / step})
    writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [e.step for e in events.Scalars('train/loss')] == [4, 8]
  assert [r['step'] for r in read_jsonl(tmp_path)] == [4, 8]


def files_of(workdir):
  """{path: bytes} of every file in a workdir but the lock: what a refused run must leave."""
  out = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      if name != 'lock':
        with open(path, 'rb') as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.mark.slow
def test_a_resume_refuses_another_seed_and_records_changed_settings(idx_dir, tmp_path):
  from cvjax import population  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(idx_dir, **{'train.num_steps': 4}), run)
  os.remove(os.path.join(run, 'results.json'))
  before = files_of(run)
  other_seed = tiny_config(idx_dir, **{'train.num_steps': 8})
  other_seed.seed = 1
  with pytest.raises(UserError, match=r'step 4 was trained with seed=0; this run asks for '
                     r'seed=1\. .*resume with seed=0 .*fresh run in a new --workdir'):
    train.train_and_evaluate(other_seed, run)
  assert files_of(run) == before  # config.json still says seed 0.
  # Changed settings: config.json holds them, config_history.jsonl says from which step.
  changed = tiny_config(idx_dir, **{'train.num_steps': 8, 'optimizer.learning_rate': 0.05})
  train.train_and_evaluate(changed, run)
  with open(os.path.join(run, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert history == [{'step': 4, 'changed': {
      'optimizer.learning_rate': {'was': 0.1, 'now': 0.05},
      'train.num_steps': {'was': 4, 'now': 8}}}]
  with open(os.path.join(run, 'config.json')) as f:
    assert json.load(f)['optimizer']['learning_rate'] == 0.05
  # A population refuses it the same way (its members' names hold their seeds).
  pop = str(tmp_path / 'pop')
  c = tiny_config(idx_dir, **{'train.num_steps': 4})
  c.population.seeds = 2
  train.train_and_evaluate(c, pop)
  os.remove(os.path.join(pop, 'results.json'))
  c = tiny_config(idx_dir, **{'train.num_steps': 8})
  c.population.seeds, c.seed = 2, 5
  assert population.is_population(c)
  before = files_of(pop)
  with pytest.raises(UserError, match=r'trained with seed=0; this run asks for seed=5'):
    train.train_and_evaluate(c, pop)
  assert files_of(pop) == before


@pytest.mark.slow
@pytest.mark.parametrize('damage, message', [
    ('not utf-8', r'metrics.jsonl is not the metrics cvjax writes: byte \d+ .* is not UTF-8'),
    ('a wrong type', r'metrics.jsonl, line 2: .* is not a record cvjax writes'),
    ('a list', r'metrics.jsonl, line 1: .* is not a record cvjax writes'),
    ('a folder', r'metrics.jsonl is a folder'),
])
def test_a_resume_on_a_damaged_metrics_file_writes_nothing(idx_dir, tmp_path, damage, message):
  run = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(idx_dir, **{'train.num_steps': 4}), str(run))
  os.remove(run / 'results.json')
  jsonl = run / 'metrics.jsonl'
  if damage == 'not utf-8':
    jsonl.write_bytes(jsonl.read_bytes() + b'{"step": 5, "train/loss": "\xff\xfe"}\n')
  elif damage == 'a wrong type':
    jsonl.write_text('{"step": 4, "train/loss": 1.0}\n{"step": "4", "train/loss": 1.0}\n')
  elif damage == 'a list':
    jsonl.write_text('[4, 1.0]\n')
  else:
    os.remove(jsonl)
    (jsonl / 'x').mkdir(parents=True)
  before = files_of(run)
  with pytest.raises(UserError, match=message + '.*nothing was written'):
    train.train_and_evaluate(tiny_config(idx_dir, **{'train.num_steps': 8,
                                                     'optimizer.learning_rate': 0.05}), str(run))
  assert files_of(run) == before


def test_a_sweep_says_how_a_trial_ended_and_leaves_no_lock_of_a_killed_one(tmp_path, monkeypatch,
                                                                          capsys):
  from cvjax import sweep  # pylint: disable=g-import-not-at-top
  (tmp_path / 'three.py').write_text(
      'def get_trials(arg=None):\n  return [("oom", {}), ("segv", {}), ("bad", {})]\n')
  ends = {'oom': 'os.kill(os.getpid(), signal.SIGKILL)',  # As the OOM killer would.
          'segv': 'os.kill(os.getpid(), signal.SIGSEGV)', 'bad': 'sys.exit(2)'}

  def trial(config, workdir, name, overrides, extra):  # Takes the lock as cvjax.main does.
    return [sys.executable, '-c', 'import os, signal, sys; from cvjax import run_lock; '
            f'run_lock.acquire({os.path.join(workdir, name)!r}); {ends[name]}']
  monkeypatch.setattr(sweep, 'trial_command', trial)
  monkeypatch.chdir(ROOT)
  status = sweep.run_sweep('configs/resnet.py', str(tmp_path / 'three.py'), str(tmp_path / 'w'))
  out = capsys.readouterr().out
  assert status == {'oom': 'failed', 'segv': 'failed', 'bad': 'failed'}
  assert ("oom: killed by SIGKILL: the kernel's out-of-memory killer, most likely" in out
          and 'segv: killed by SIGSEGV.' in out
          and 'bad: failed with exit status 2: a configuration or input error' in out), out
  assert not os.path.exists(tmp_path / 'w' / 'oom' / 'lock')
  assert not os.path.exists(tmp_path / 'w' / 'segv' / 'lock')
  assert os.path.exists(tmp_path / 'w' / 'bad' / 'lock')  # Its own exit: never the sweep's to take.


@pytest.mark.slow
def test_memory_is_estimated_at_start_up_and_a_run_that_cannot_fit_is_refused(
    idx_dir, tmp_path, monkeypatch, caplog):
  from cvjax import memory_estimate, population  # pylint: disable=g-import-not-at-top
  caplog.set_level('INFO', logger='absl')
  c = tiny_config(idx_dir, **{'train.num_steps': 2})
  train.train_and_evaluate(c, str(tmp_path / 'one'))
  assert re.search(r'Memory: about \d+ MiB estimated by tracing the step \(train state .*\); '
                   r'this machine has [\d.]+ GiB available', caplog.text), caplog.text
  monkeypatch.setattr(memory_estimate, 'available_bytes', lambda: 4 * 2 ** 20)  # 4 MiB.
  c.population.seeds = 4
  assert population.is_population(c)
  with pytest.raises(UserError, match=r'this run needs about \d+ MiB more host memory \(train '
                     r'state .*for 4 members\) and this machine has 4 MiB available: .*Train fewer '
                     r'members .*CVJAX_IGNORE_MEMORY_ESTIMATE=1'):
    train.train_and_evaluate(c, str(tmp_path / 'pop'))
  assert not (tmp_path / 'pop').exists()
  assert "estimated by XLA's memory analysis" in caplog.text
  monkeypatch.setenv('CVJAX_IGNORE_MEMORY_ESTIMATE', '1')  # The override: a warning instead.
  assert memory_estimate.check(experiment.build(c)) > 4 * 2 ** 20
  assert 'CVJAX_IGNORE_MEMORY_ESTIMATE=1: running anyway' in caplog.text
