"""Sweeps, reports, error analysis, gradient norms and HParams, on tiny real runs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from cvjax import error_analysis, sweep
from cvjax.data import memory
from cvjax.tools import report

TINY = ['--config.train.batch_size=16', '--config.train.eval_batch_size=8',
        '--config.train.num_steps=6', '--config.train.log_every_steps=3',
        '--config.train.eval_every_steps=3', '--config.train.checkpoint_every_steps=3',
        '--config.input.crop_padding=2']


@pytest.fixture(scope='module')
def tiny_sweep(idx_dir, tmp_path_factory):
  """A plain/residual pair of ResNet-8s with gradient norms, run through cvjax.sweep."""
  root = tmp_path_factory.mktemp('sweep')
  sweep_file = root / 'pair.py'
  sweep_file.write_text(
      'def get_trials(arg=None):\n'
      '  return [(f"{\'resnet\' if r else \'plain\'}8", {"model.depth": 8, "model.residual": r,\n'
      '           "train.grad_norm_every_steps": 3}) for r in (False, True)]\n')
  workdir = str(root / 'runs')
  extra = [f'--config.dataset.path={idx_dir}', *TINY]
  cwd = os.getcwd()
  os.chdir(ROOT)  # Trial commands name configs/ relative to the repo.
  try:
    status = sweep.run_sweep('configs/resnet.py', str(sweep_file), workdir, extra=extra)
  finally:
    os.chdir(cwd)
  return {'file': str(sweep_file), 'workdir': workdir, 'extra': extra, 'status': status}


@pytest.mark.slow
def test_sweep_runs_each_trial_into_its_folder(tiny_sweep):
  assert tiny_sweep['status'] == {'plain8': 'ran', 'resnet8': 'ran'}
  for name, residual in (('plain8', False), ('resnet8', True)):
    trial = os.path.join(tiny_sweep['workdir'], name)
    config = json.load(open(os.path.join(trial, 'config.json')))
    assert config['model']['residual'] is residual and config['train']['num_steps'] == 6
    results = json.load(open(os.path.join(trial, 'results.json')))
    assert results['step'] == 6 and results['num_params'] == 75_002


@pytest.mark.slow
def test_sweep_skips_finished_and_resumes_interrupted(tiny_sweep):
  workdir = tiny_sweep['workdir']
  # Interrupt resnet8 after its step-3 checkpoint.
  os.remove(os.path.join(workdir, 'resnet8', 'results.json'))
  shutil.rmtree(os.path.join(workdir, 'resnet8', 'checkpoints', '6'))
  out = subprocess.run(
      [sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py',
       f'--sweep={tiny_sweep["file"]}', f'--workdir={workdir}', *tiny_sweep['extra']],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'plain8 skipped, resnet8 ran' in out.stdout
  assert 'Resuming from the checkpoint at step 3' in out.stderr
  steps = [json.loads(l)['step'] for l in open(os.path.join(workdir, 'resnet8', 'metrics.jsonl'))
           if 'train/loss' in l]
  assert steps == [3, 6]


def test_sweep_dry_run_and_expansion():
  trials = sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py:single,quick'))
  names = [n for n, _ in trials]
  assert names == ['plain20', 'plain32', 'plain44', 'plain56', 'resnet20', 'resnet32', 'resnet44',
                   'resnet56', 'resnet110']
  assert all(o['train.num_epochs'] == 3.0 for _, o in trials)
  assert dict(trials)['resnet110']['schedule.warmup_steps'] == 400
  full = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py:single')))
  assert 'train.num_epochs' not in full['plain56']
  acts = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/activations.py')))
  assert len(acts) == 9 and acts['sigmoid44']['model.batch_norm'] is False
  out = subprocess.run(
      [sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py',
       '--sweep=experiments/depth_ablation.py:single,quick', '--workdir=/nonexistent', '--dry_run',
       '--only=plain56,resnet56', '--config.train.batch_size=64'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  lines = [l for l in out.stdout.splitlines() if 'cvjax.main' in l]
  assert len(lines) == 2 and '--workdir=/nonexistent/plain56' in lines[0]
  assert '--config.model.depth=56' in lines[1] and '--config.model.residual=True' in lines[1]
  assert '--config.train.batch_size=64' in lines[1]
  assert not os.path.exists('/nonexistent')


def test_the_command_line_wins_over_the_sweep_file(capsys):
  """`--config.population.seeds=2` on a sweep replaces each trial's own `population.seeds=3`;
  an override of the field the trials differ by (the depth) is a clear error."""
  spec = os.path.join(ROOT, 'experiments/depth_ablation.py:quick')
  status = sweep.run_sweep('configs/resnet.py', spec, 'runs/d', dry_run=True,
                           only=['depth20', 'depth56'],
                           extra=['--config.population.seeds=2', '--config.train.num_epochs=1'])
  assert status == {'depth20': 'dry-run', 'depth56': 'dry-run'}
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if 'cvjax.main' in l]
  assert len(lines) == 2
  for line in lines:
    assert '--config.population.seeds=2' in line and 'population.seeds=3' not in line
    assert '--config.train.num_epochs=1' in line and 'num_epochs=3.0' not in line
  assert "replaces the trial's population.seeds=3" in out
  with pytest.raises(sweep.errors.UserError, match='model.depth.*--only'):
    sweep.run_sweep('configs/resnet.py', spec, 'runs/d', dry_run=True,
                    extra=['--config.model.depth=32'])
  # One trial chosen: the depth is the user's.
  sweep.run_sweep('configs/resnet.py', spec, 'runs/d', dry_run=True, only=['depth20'],
                  extra=['--config.model.depth=32'])
  line = [l for l in capsys.readouterr().out.splitlines() if 'cvjax.main' in l][0]
  assert '--config.model.depth=32' in line and 'depth=20' not in line


@pytest.mark.slow
def test_report_from_the_tiny_sweep(tiny_sweep):
  out = report.write_report(tiny_sweep['workdir'])
  for f in ('figure6.png', 'table6.md', 'leaderboard.md', 'grad_norms.png', 'grad_norms.md',
            'README.md'):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  table = open(os.path.join(out, 'table6.md')).read().splitlines()
  assert len(table) == 4 and table[2].startswith('| plain | 8 | 75,002 |')
  board = open(os.path.join(out, 'leaderboard.md')).read()
  assert 'plain8' in board and 'resnet8' in board and board.count('finished') == 2
  norms = open(os.path.join(out, 'grad_norms.md')).read().splitlines()
  assert len(norms) == 4  # Header, rule, one row per trial.
  assert {row.split(' | ')[1] for row in norms[2:]} == {'plain-8', 'ResNet-8'}  # Named nets.

  # One run (a workdir, not a sweep): its own report.
  single = report.write_report(os.path.join(tiny_sweep['workdir'], 'resnet8'))
  board = open(os.path.join(single, 'leaderboard.md')).read()
  assert 'resnet8' in board and 'plain8' not in board and board.count('finished') == 1
  assert os.path.getsize(os.path.join(single, 'figure6.png')) > 0


@pytest.mark.slow
def test_grad_norms_are_logged_per_layer_in_forward_order(tiny_sweep):
  trial = os.path.join(tiny_sweep['workdir'], 'plain8')
  records = [json.loads(l) for l in open(os.path.join(trial, 'metrics.jsonl'))]
  logged = [r for r in records if 'train/grad_norm' in r]
  assert [r['step'] for r in logged] == [0, 3]
  order = json.load(open(os.path.join(trial, 'results.json')))['layer_order']
  # ResNet-8: the stem conv, 2 convs in each of 3 blocks, the head.
  assert order[0] == 'Conv_0' and order[-1] == 'head' and len(order) == 8
  assert all(f'grad_norm/{layer}' in logged[0] for layer in order)
  assert all(v > 0 for k, v in logged[0].items() if k.startswith('grad_norm/'))


@pytest.mark.slow
def test_hparams_and_error_analysis_written(tiny_sweep):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  trial = os.path.join(tiny_sweep['workdir'], 'resnet8')
  events = event_accumulator.EventAccumulator(os.path.join(trial, 'hparams'))
  events.Reload()
  assert events.PluginTagToContent('hparams')  # The HParams dashboard's records.
  assert 'hparams/test/error' in events.Tags()['scalars']
  analysis = json.load(open(os.path.join(trial, 'error_analysis', 'error_analysis.json')))
  cm = np.array(analysis['confusion_matrix'])
  assert cm.shape == (10, 10) and cm.sum() == 40 == analysis['num_test']
  assert analysis['num_mistakes'] == cm.sum() - np.trace(cm)
  assert analysis['mistakes_shown'] == min(100, analysis['num_mistakes'])
  for f in ('confusion.png', 'mistakes.png', 'per_class_error.png'):
    assert os.path.getsize(os.path.join(trial, 'error_analysis', f)) > 0


def find_tile(grid, tile):
  """(y, x) of the top-left corner where `tile` (H, W, 3) lies in `grid`, or None."""
  windows = np.lib.stride_tricks.sliding_window_view(grid[..., 0], tile.shape[1], axis=1)
  for y, x in zip(*np.nonzero(np.all(windows == tile[0, :, 0], axis=-1))):
    if np.array_equal(grid[y:y + tile.shape[0], x:x + tile.shape[1]], tile):
      return y, x
  return None


def test_mistakes_grid_takes_each_class_in_turn_most_confident_first():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (30, 8, 8, 1), np.uint8)
  labels = np.array([0] * 10 + [1] * 10 + [2] * 10)  # Class by class, as an image folder.
  predictions = labels.copy()
  wrong = [1, 2, 3, 4, 11, 12, 25]
  predictions[wrong] = (labels[wrong] + 1) % 3
  confidence = np.linspace(0.3, 0.9, 30)  # Later examples more confident.
  order = error_analysis.pick_mistakes(labels, predictions, confidence, max_tiles=100)
  # Round 1: each class's most confident mistake; then the next ones, class by class.
  assert order.tolist() == [4, 12, 25, 3, 11, 2, 1]
  assert error_analysis.pick_mistakes(labels, predictions, confidence, 4).tolist() == [4, 12, 25, 3]
  assert error_analysis.pick_mistakes(labels, predictions).tolist() == [1, 11, 25, 2, 12, 3, 4]

  grid, captions = error_analysis.mistakes_image(images, labels, predictions, ['a', 'b', 'c'],
                                                 confidence=confidence)
  assert captions[0] == f'a -> b {100 * confidence[4]:.0f}%' and len(captions) == 7
  # Each tile is its test image scaled 12x (8 -> 96 pixels), grey drawn as the data hold it.
  places = [find_tile(grid, np.repeat(images[i].repeat(12, 0).repeat(12, 1), 3, axis=-1))
            for i in order]
  assert None not in places
  assert sorted(places, key=lambda p: (p[0], p[1])) == places  # In reading order.
  cm = error_analysis.confusion_matrix(labels, predictions, 3)
  assert cm.sum() == 30 and np.trace(cm) == 23
  # Per class: the share of that class's images predicted as something else.
  expected = [np.mean(predictions[labels == c] != c) for c in range(3)]
  np.testing.assert_allclose(error_analysis.per_class_error(cm), expected)


def test_confusion_colours_show_the_mistakes():
  """A net right 90-95% of the time: the colours are the mistakes as shares of each true
  class (the diagonal left out, grey), a square-root scale up to the largest, so few mistakes
  still show: 2 of class c's 20 images are the darkest cell, above 5 of class a's 100."""
  cm = np.diag([95, 95, 18, 100])
  cm[0, 1], cm[1, 0], cm[1, 3], cm[2, 3] = 5, 2, 3, 2  # a, b: 100 images each; c: 20.
  image = error_analysis.confusion_figure(cm, ['a', 'b', 'c', 'd']).axes[0].images[0]
  shown = image.norm(image.get_array())
  assert np.ma.getmaskarray(shown)[np.eye(4, dtype=bool)].all()  # The diagonal: grey.
  np.testing.assert_allclose([shown[2, 3], shown[0, 1], shown[1, 3], shown[1, 0], shown[3, 1]],
                             np.sqrt([1.0, 0.5, 0.3, 0.2, 0.0]), atol=1e-6)  # sqrt scale.


FIGURES = """
import sys
import matplotlib, numpy as np
from matplotlib import pyplot as plt
from cvjax import error_analysis
from cvjax.tools import report
rng = np.random.default_rng(0)
labels = np.arange(12) % 3
error_analysis.write(sys.argv[1], rng.integers(0, 255, (12, 8, 8, 1), np.uint8), labels,
                     (labels + (np.arange(12) < 4)) % 3, ['a', 'b', 'c'], step=1)
model = {'name': 'resnet_cifar', 'depth': 8, 'residual': True, 'activation': 'relu'}
run = {'name': 'r8', 'trial': 'r8', 'config': {'model': model}, 'results': None,
       'records': [{'step': 0, 'grad_norm/a': 1.0, 'train/error': 0.5, 'test/error': 0.6}]}
nets = report.group_nets([run])
assert report.figure6(nets, sys.argv[2]) is not None and report.grad_norm_report(nets, sys.argv[3])
print(matplotlib.get_backend(), plt.get_fignums())
"""


@pytest.mark.slow
def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
  """A notebook's inline backend (here: svg) stays, so its own plots still show."""
  paths = [str(tmp_path), str(tmp_path / 'f6.png'), str(tmp_path / 'g.png')]
  out = subprocess.run([sys.executable, '-c', FIGURES, *paths], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, MPLBACKEND='svg'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['svg', '[]']
  for f in ('f6.png', 'g.png', 'error_analysis/mistakes.png', 'error_analysis/confusion.png'):
    assert os.path.getsize(tmp_path / f) > 0, f

@pytest.mark.slow
def test_evaluate_a_checkpoint_write_predictions_and_score_them(tiny_sweep, idx_dir):
  """cvjax.evaluate on a finished run: the error analysis again, and a predictions file
  that --score checks against the labels to the same top-1 error."""
  trial = os.path.join(tiny_sweep['workdir'], 'plain8')
  shutil.rmtree(os.path.join(trial, 'error_analysis'))
  predictions = os.path.join(trial, 'predictions.txt')
  out = subprocess.run([sys.executable, '-m', 'cvjax.evaluate', f'--workdir={trial}',
                        f'--predictions={predictions}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'of 40 test images misclassified' in out.stdout
  analysis = json.load(open(os.path.join(trial, 'error_analysis', 'error_analysis.json')))
  assert analysis['step'] == 6 and analysis['num_test'] == 40
  lines = open(predictions).read().splitlines()
  assert len(lines) == 40 and all(len(set(line.split())) == 5 for line in lines)

  labels = os.path.join(trial, 'labels.txt')
  test_labels = memory.load_local(idx_dir).test_labels
  with open(labels, 'w') as f:
    f.writelines(f'{int(y) + 1}\n' for y in test_labels)
  out = subprocess.run([sys.executable, '-m', 'cvjax.evaluate', f'--score={predictions}',
                        f'--labels={labels}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  top1 = 100 * analysis['num_mistakes'] / 40
  assert f'40 images: top-1 error {top1:.2f}%' in out.stdout, (out.stdout, top1)
