"""Trained weights that ship (trained/, cvjax/shipped.py, cvjax.tools.ship): each shipped run
reproduces its results.json on the data that ships with cvjax, and shipping keeps what a
finished run needs and nothing of ours."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT, bars, tiny_config, write_idx
from cvjax import evaluate, shipped, train
from cvjax.errors import UserError
from cvjax.tools import ship

TRAINED = os.path.join(ROOT, 'trained')
SHIPPED = sorted(d for d in (os.listdir(TRAINED) if os.path.isdir(TRAINED) else [])
                 if shipped.is_shipped(os.path.join(TRAINED, d)))
# The CIFAR-10 test images that ship (cifar10_6k) are files 0000-0099 of each class of the
# test set the CIFAR runs evaluated on (the same JPEG tree, byte for byte; its README): in the
# evaluation's order (sorted paths, 1,000 per class) the rows c * 1000 + i, i < 100.
CIFAR_SUBSET = np.concatenate([np.arange(100) + 1000 * c for c in range(10)])


def read(path):
  with open(path) as f:
    return f.read()


def top1_of(predictions_file):
  return np.array([int(line.split()[0]) - 1 for line in read(predictions_file).splitlines()])


def test_some_run_ships():
  assert SHIPPED, f'no shipped run in {TRAINED}'


@pytest.mark.parametrize('name', SHIPPED)
def test_a_shipped_run_names_no_local_path_and_has_no_optimizer_state(name):
  run = os.path.join(TRAINED, name)
  assert json.loads(read(os.path.join(run, 'config.json')))['dataset']['path'] == ''
  assert not os.path.exists(os.path.join(run, 'checkpoints'))
  assert not os.path.exists(os.path.join(run, 'lock'))
  results = json.loads(read(os.path.join(run, 'results.json')))
  # The predictions that ship are the ones results.json counts: its mistakes, to the image.
  analysis = json.loads(read(os.path.join(run, 'error_analysis', 'error_analysis.json')))
  cm = np.array(analysis['confusion_matrix'])
  top1 = top1_of(os.path.join(run, 'test_predictions.txt'))
  assert len(top1) == cm.sum() == results['test/count']
  predicted = np.bincount(top1, minlength=len(cm))
  np.testing.assert_array_equal(predicted, cm.sum(axis=0))  # Each class predicted as often.
  assert results['num_mistakes'] == cm.sum() - np.trace(cm)


@pytest.mark.slow
@pytest.mark.parametrize('name', SHIPPED)
def test_a_shipped_run_reproduces_its_results_on_the_data_that_ships(name, tmp_path):
  run = str(tmp_path / name)
  shutil.copytree(os.path.join(TRAINED, name), run)  # Evaluation writes its error analysis.
  config = evaluate.read_run_config(run)
  results = json.loads(read(os.path.join(run, 'results.json')))
  expected = top1_of(os.path.join(run, 'test_predictions.txt'))
  if config.dataset.name == 'cifar10':  # The 1,000 test images that ship of its 10,000.
    config, expected = evaluate.with_data(config, 'cifar10_6k'), expected[CIFAR_SUBSET]
  else:
    assert config.dataset.name in ('mnist10k', 'cifar10_6k'), 'its test set must ship'
  predictions = str(tmp_path / 'predictions.txt')
  metrics, analysis = evaluate.evaluate_checkpoint(config, run, predictions)
  got = top1_of(predictions)
  # Another CPU's float rounding may flip an image whose top two logits (nearly) tie.
  assert np.sum(got != expected) <= 1, np.flatnonzero(got != expected)
  if len(got) == results['test/count']:
    assert abs(analysis['num_mistakes'] - results['num_mistakes']) <= 1
    assert analysis['step'] == results['step']


@pytest.fixture(scope='module')
def finished(idx_dir, tmp_path_factory):
  """(workdir, test metrics) of the tiny run (12 steps), trained once for the tests below."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  _, test = train.train_and_evaluate(tiny_config(idx_dir), workdir)
  return workdir, test


def copy_of(finished, tmp_path):
  """A test's own copy of the finished run (the tests ship, damage or edit it)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  return workdir, finished[1]


def test_ship_keeps_the_weights_and_evaluation_reads_them(idx_dir, finished, tmp_path):
  workdir, test = copy_of(finished, tmp_path)
  config_json = json.loads(read(os.path.join(workdir, 'config.json')))
  assert config_json['dataset']['path'] == idx_dir

  error, meta = ship.ship(evaluate.read_run_config(workdir), workdir)
  assert error == test['test/error'] and meta['step'] == 12
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  assert json.loads(read(os.path.join(workdir, 'config.json')))['dataset']['path'] == ''
  with pytest.raises(UserError, match='shipped already'):
    ship.ship(evaluate.read_run_config(workdir), workdir)

  # The user's own copy of the data (here: the same files) through --data.
  config = evaluate.with_data(evaluate.read_run_config(workdir), idx_dir)
  metrics, _ = evaluate.evaluate_checkpoint(config, workdir, str(tmp_path / 'p.txt'))
  assert metrics['test/error'] == test['test/error']
  assert read(tmp_path / 'p.txt') == read(os.path.join(workdir, 'test_predictions.txt'))

  with pytest.raises(UserError, match='shipped weights of a finished run'):
    train.train_and_evaluate(config, workdir)  # Nothing to resume: no optimizer state.

  with open(os.path.join(workdir, shipped.WEIGHTS), 'r+b') as f:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  with pytest.raises(UserError, match='does not match the sha256'):
    evaluate.evaluate_checkpoint(config, workdir)


def test_ship_refuses_an_unfinished_run(finished, tmp_path):
  workdir, _ = copy_of(finished, tmp_path)
  config = evaluate.read_run_config(workdir)
  config.train.num_steps = 24  # The same checkpoint, now short of its run's end.
  with pytest.raises(UserError, match='only a finished run ships'):
    ship.ship(config, workdir)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints'))


def test_data_of_other_classes_is_refused(idx_dir, finished, tmp_path):
  workdir, _ = copy_of(finished, tmp_path)
  ship.ship(evaluate.read_run_config(workdir), workdir)
  meta = json.loads(read(os.path.join(workdir, shipped.META)))
  meta['class_names'] = meta['class_names'][::-1]
  with open(os.path.join(workdir, shipped.META), 'w') as f:
    json.dump(meta, f)
  config = evaluate.with_data(evaluate.read_run_config(workdir), idx_dir)
  with pytest.raises(UserError, match='trained on the classes'):
    evaluate.evaluate_checkpoint(config, workdir)


def test_a_config_json_of_an_older_cvjax_evaluates_with_the_defaults_of_its_missing_fields(
    finished, tmp_path):
  """A run written before fields were added to configs/common.py lacks them in its config.json:
  reading it back gives them their defaults (configs.common.complete), and it evaluates."""
  workdir, test = copy_of(finished, tmp_path)
  path = os.path.join(workdir, 'config.json')
  saved = json.loads(read(path))
  for section, field in (('train', 'ema_decay'), ('train', 'steps_per_call'),
                         ('train', 'native_conv'), ('train', 'skip_nonfinite'),
                         ('input', 'alternate_flip'), ('input', 'crop_pad_mode'),
                         ('input', 'random_erasing'), ('dataset', 'pipeline')):
    del saved[section][field]
  for section in ('eval', 'mesh', 'population'):
    del saved[section]
  with open(path, 'w') as f:
    json.dump(saved, f)
  config = evaluate.read_run_config(workdir)
  assert (config.train.ema_decay, config.train.steps_per_call, config.input.alternate_flip,
          config.eval.crops, config.mesh.model, config.population.seeds) == (0.0, 1, False, 1, 1, 1)
  assert config.model.to_dict() == saved['model']  # The family's fields, as saved.
  metrics, _ = evaluate.evaluate_checkpoint(config, workdir)
  assert metrics['test/error'] == test['test/error']


def test_evaluation_normalises_with_the_statistics_the_run_trained_with(finished, idx_dir,
                                                                        tmp_path):
  """A copy of the data whose training split differs (a subset; lossless images of a run
  trained on JPEGs) has other input statistics: the shipped run's own are used."""
  workdir, _ = copy_of(finished, tmp_path)
  ship.ship(evaluate.read_run_config(workdir), workdir)
  other = tmp_path / 'other'  # The same test files; a training split of white images.
  shutil.copytree(idx_dir, other)
  images, labels = bars(96, seed=0)
  write_idx(str(other), np.full_like(images, 255), labels, 'train')
  config = evaluate.with_data(evaluate.read_run_config(workdir), str(other))
  evaluate.evaluate_checkpoint(config, workdir, str(tmp_path / 'p.txt'))
  assert read(tmp_path / 'p.txt') == read(os.path.join(workdir, 'test_predictions.txt'))

  os.rename(os.path.join(workdir, shipped.NORMALIZATION), tmp_path / 'moved.npz')
  evaluate.evaluate_checkpoint(config, workdir, str(tmp_path / 'q.txt'))  # The data's own.
  assert read(tmp_path / 'q.txt') != read(os.path.join(workdir, 'test_predictions.txt'))

  with open(os.path.join(workdir, shipped.NORMALIZATION), 'wb') as f:
    f.write(b'not an npz')
  with pytest.raises(UserError, match='normalization.npz is not what cvjax.tools.ship writes'):
    evaluate.evaluate_checkpoint(config, workdir)
