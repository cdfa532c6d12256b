"""Scoring prediction files in the challenge format (cvjax.evaluate --score)."""

import subprocess
import sys

import pytest

from conftest import ROOT
from cvjax import evaluate
from cvjax.errors import UserError


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_score_counts_top1_and_top5(tmp_path):
  labels = write(tmp_path, 'labels.txt', '3\n1\n7\n2\n')
  predictions = write(tmp_path, 'p.txt', '3 1 2 4 5\n2 1 3 4 5\n1 2 3 4 5\n9 8 6 5 4\n')
  # Image 1 right at top-1; image 2 in the top 5; image 3 and 4 wrong in all five.
  assert evaluate.score(predictions, labels) == {'count': 4, 'top1_error': 0.75,
                                                 'top5_error': 0.5}


def test_written_predictions_are_one_based_best_first(tmp_path):
  path = str(tmp_path / 'p.txt')
  evaluate.write_predictions(path, [[0, 4, 2, 1, 3], [9, 8, 7, 6, 5]])
  assert open(path).read() == '1 5 3 2 4\n10 9 8 7 6\n'
  labels = write(tmp_path, 'labels.txt', '1\n8\n')
  assert evaluate.score(path, labels)['top1_error'] == 0.5


@pytest.mark.parametrize('predictions,labels,message', [
    ('1 2 3 4 5\n', '1\n2\n', 'has 1 lines and .* 2'),
    ('1 2 3 4 5 6\n', '1\n', 'expected 1 to 5 labels, got 6'),
    ('1 2 x\n', '1\n', "line 1: '1 2 x' is not a list of integer labels"),
    ('0 1 2 3 4\n', '1\n', 'numbered from 1'),
    ('1\n', '1 2\n', 'expected one label per line'),
    ('\n', '1\n', 'is empty'),
])
def test_malformed_files_are_refused_with_the_line(tmp_path, predictions, labels, message):
  with pytest.raises(UserError, match=message):
    evaluate.score(write(tmp_path, 'p.txt', predictions), write(tmp_path, 'l.txt', labels))


def test_missing_files_are_refused(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    evaluate.score(str(tmp_path / 'nope.txt'), write(tmp_path, 'l.txt', '1\n'))


def test_an_error_is_printed_once(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'cvjax.evaluate', f'--workdir={tmp_path}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.count('config.json not found') == 1, out.stderr


def test_binary_files_a_bad_predictions_path_and_a_garbage_config_are_refused(tmp_path):
  labels = write(tmp_path, 'labels.txt', '1\n')
  binary = tmp_path / 'p.bin'
  binary.write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe')
  with pytest.raises(UserError, match=r'p.bin is not text \(byte 0 is'):
    evaluate.score(str(binary), labels)
  with pytest.raises(UserError, match=r'the folder .*missing does not exist'):
    evaluate.check_writable(str(tmp_path / 'missing' / 'p.txt'))
  with pytest.raises(UserError, match=r'is a folder'):
    evaluate.check_writable(str(tmp_path))
  evaluate.check_writable(str(tmp_path / 'p.txt'))
  for text, why in (('{"model": [garb', 'JSONDecodeError'), ('[1, 2]', 'holds a list')):
    (tmp_path / 'config.json').write_text(text)
    with pytest.raises(UserError, match=f'config.json is not a config cvjax wrote .*{why}'):
      evaluate.read_run_config(str(tmp_path))


@pytest.mark.parametrize('record', [
    'metrics.jsonl', 'config.json', 'results.json', 'config_history.jsonl',
    'events.out.tfevents.1.host.0', 'checkpoints/10/state', 'error_analysis/summary.json',
    'members/lr0.1_seed0/metrics.jsonl', 'members/lr0.1_seed0/config.json',
    'members/lr0.1_seed0/error_analysis/summary.json'])
def test_predictions_never_replace_a_run_record(tmp_path, record):
  run = tmp_path / 'run'
  (run / record).parent.mkdir(parents=True, exist_ok=True)
  (run / record).write_text('{"step": 1}\n')
  (run / 'members' / 'lr0.1_seed0').mkdir(parents=True, exist_ok=True)
  with pytest.raises(UserError, match=f'is {record} of the run in .*Nothing was written'):
    evaluate.check_writable(str(run / record), str(run))
  # A relative path and a link lead to the same file.
  (tmp_path / 'link').symlink_to(run)
  with pytest.raises(UserError, match='of the run in'):
    evaluate.check_writable(str(tmp_path / 'link' / record), str(run))
  evaluate.check_writable(str(run / 'predictions.txt'), str(run))  # Not a record: fine.
  evaluate.check_writable(str(run / 'members' / 'lr0.1_seed0' / 'predictions.txt'), str(run))
  evaluate.check_writable(str(tmp_path / 'metrics.jsonl'), str(run))  # Outside the run.


def test_evaluate_refuses_predictions_over_a_run_record_before_anything(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.0}\n')
  out = subprocess.run([sys.executable, '-m', 'cvjax.evaluate', f'--workdir={tmp_path}',
                        f'--predictions={tmp_path}/metrics.jsonl'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'is metrics.jsonl of the run' in out.stderr, out.stderr
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1, "train/loss": 2.0}\n'


def test_ctrl_c_while_the_config_loads_is_one_line_and_writes_nothing(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  shutil.copytree(os.path.join(ROOT, 'trained', 'mnist10k_lenet5'), run)
  before = sorted(p.name for p in run.iterdir())
  proc = subprocess.Popen([sys.executable, '-m', 'cvjax.evaluate', f'--workdir={run}'],
                          cwd=ROOT, stderr=subprocess.PIPE, text=True)
  # Once the command catches SIGTERM, which it does right after SIGINT (Python's own SIGINT
  # handler is there from the start), before the flags load the config and JAX; the evaluation
  # then takes ~10 s or more.
  deadline = time.monotonic() + 60
  while not int(next(l for l in open(f'/proc/{proc.pid}/status') if l.startswith('SigCgt:'))
                .split()[1], 16) & (1 << (signal.SIGTERM - 1)):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, err
  assert 'cvjax.evaluate: stopped by SIGINT; nothing was written' in err and 'Traceback' not in err
  assert sorted(p.name for p in run.iterdir()) == before


def test_a_signal_while_files_are_written_waits_for_them(monkeypatch, capsys):
  import signal  # pylint: disable=g-import-not-at-top
  exits = []
  monkeypatch.setattr(evaluate, '_exit', exits.append)
  with evaluate._uninterrupted():  # pylint: disable=protected-access
    evaluate._stopped(signal.SIGTERM)  # pylint: disable=protected-access
    assert not exits  # Held while writing.
  assert exits == [128 + signal.SIGTERM]
  assert 'stopped by SIGTERM after writing its files' in capsys.readouterr().err
  evaluate._stopped(signal.SIGINT)  # pylint: disable=protected-access
  assert exits[-1] == 128 + signal.SIGINT
