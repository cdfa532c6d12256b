"""cvjax.tools.report over seeds: population folders and single runs written to disk with
made-up curves (no training), the numbers recomputed here; and the population sweep files."""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from conftest import ROOT
from cvjax import errors, sweep
from cvjax.tools import report

PER_EPOCH, EPOCHS = 390, 4  # Evaluated once per epoch (train.eval_every_steps=0), logged /130.
VARY = 'model.residual=False,True'


def base_config(depth, residual, seed, **train):
  from configs import resnet  # pylint: disable=g-import-not-at-top
  c = json.loads(resnet.get_config(f'{"resnet" if residual else "plain"}{depth}').to_json())
  c['seed'] = seed
  c['train'].update(num_epochs=float(EPOCHS), eval_every_steps=0, **train)
  c['population'] = {'seeds': 1, 'vary': ''}
  return c


def made_up_error(depth, residual, seed, epoch):
  """A made-up curve: falls with the epochs, deeper plain nets worse, each seed its own."""
  floor = (0.08 if residual else 0.09 + 0.002 * depth)
  noise = np.random.default_rng((depth, residual, seed, int(1000 * epoch))).random()
  return round(floor + 0.5 / epoch + 0.1 * noise / epoch ** 0.5, 6)


def write_run(folder, config, finished=True, epochs=EPOCHS, grad_norms=None, eval_once=False):
  """An ordinary run folder as cvjax.main leaves it (`eval_once`: tested at the end only);
  returns its final test error."""
  os.makedirs(folder, exist_ok=True)
  depth, residual = config['model'].get('depth', 5), config['model'].get('residual', True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  rows = []
  if grad_norms is not None:
    rows.append({'step': 0, **{f'grad_norm/conv{i}': g for i, g in enumerate(grad_norms)}})
  for step in range(130, epochs * PER_EPOCH + 1, 130):
    rows.append({'step': step, 'train/loss': 1.0, 'train/error': made_up_error(
        depth, residual, config['seed'], step / PER_EPOCH) - 0.07})
    if step % PER_EPOCH == 0 and (not eval_once or step == epochs * PER_EPOCH):
      rows.append({'step': step, 'test/loss': 1.0, 'test/error': made_up_error(
          depth, residual, config['seed'], step // PER_EPOCH)})
  with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  error = rows[-1]['test/error']
  results = {'step': epochs * PER_EPOCH, 'test/error': error, 'test/count': 10000.0,
             'train/error': rows[-2]['train/error'], 'num_mistakes': int(error * 10000),
             'num_params': 1000 * depth + residual}
  if finished:
    with open(os.path.join(folder, 'results.json'), 'w') as f:
      json.dump(results, f)
  return results


def write_population(folder, depth, seeds, finished=True, vary=VARY, epochs=EPOCHS, **train):
  """A population folder: config.json, members/<name>/ and, when finished, results.json."""
  os.makedirs(folder)
  config = base_config(depth, True, 0, **train)
  config['population'] = {'seeds': seeds, 'vary': vary}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  members = {}
  for residual in ((False, True) if vary else (True,)):
    for seed in range(seeds):
      name = f'residual{residual}_seed{seed}' if vary else f'seed{seed}'
      members[name] = write_run(os.path.join(folder, 'members', name),
                                base_config(depth, residual, seed, **train),
                                finished=finished, epochs=epochs)
  if finished:
    errors = [r['test/error'] for r in members.values()]
    with open(os.path.join(folder, 'results.json'), 'w') as f:
      json.dump({'step': epochs * PER_EPOCH, 'members': members,
                 'mean': {'test/error': float(np.mean(errors))},
                 'std': {'test/error': float(np.std(errors, ddof=1))}}, f)
  return members


def table(path):
  """{first two cells: {header: cell}} of a markdown table."""
  lines = open(path).read().splitlines()
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  rows = [[c.strip() for c in l.strip('|').split('|')] for l in lines[2:]]
  return {(r[0], r[1]): dict(zip(header, r)) for r in rows}


def pm(errors):
  return f'{100 * statistics.mean(errors):.2f} ± {100 * statistics.stdev(errors):.2f}'


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """depth20: a finished population (plain and residual x 3 seeds); depth56: one still
  training (no results.json, though a member wrote its own); resnet20 and resnet110: single
  runs, the first a fourth seed of the population's ResNet-20."""
  root = str(tmp_path_factory.mktemp('mixed'))
  finished = write_population(os.path.join(root, 'depth20'), 20, seeds=3)
  write_population(os.path.join(root, 'depth56'), 56, seeds=2, finished=False, epochs=2)
  with open(os.path.join(root, 'depth56', 'members', 'residualTrue_seed0', 'results.json'),
            'w') as f:
    json.dump({'step': 780, 'test/error': 0.5, 'num_params': 1}, f)
  finished['resnet20'] = write_run(os.path.join(root, 'resnet20'), base_config(20, True, 7))
  single = write_run(os.path.join(root, 'resnet110'), base_config(110, True, 0))
  out = report.write_report(root)
  return {'root': root, 'out': str(out), 'finished': finished, 'single': single}


def test_table6_gives_mean_std_best_and_seeds_per_net(mixed):
  rows = table(os.path.join(mixed['out'], 'table6.md'))
  for residual, method in ((False, 'plain'), (True, 'ResNet')):
    names = [f'residual{residual}_seed{s}' for s in range(3)] + ['resnet20'] * residual
    errors = [mixed['finished'][name]['test/error'] for name in names]
    row = rows[(method, '20')]
    assert row['test error (%)'] == pm(errors)
    assert row['best (%)'] == f'{100 * min(errors):.2f}'
    assert row['seeds'] == str(len(names)) and row['steps'] == str(EPOCHS * PER_EPOCH)
    assert row['parameters'] == f'{20_000 + residual:,}'
  assert rows[('ResNet', '20')]['paper (%)'] == '8.75'
  assert rows[('ResNet', '20')]['5-seed reproduction (%)'] == '8.51 ± 0.22'
  assert rows[('plain', '20')]['paper (%)'] == '-'
  assert rows[('plain', '20')]['5-seed reproduction (%)'] == '9.78 ± 0.13'
  # One seed reads as a single run did: no ±, no best.
  r110 = rows[('ResNet', '110')]
  assert r110['test error (%)'] == f'{100 * mixed["single"]["test/error"]:.2f}'
  assert r110['best (%)'] == '-' and r110['seeds'] == '1'
  assert r110['paper (%)'] == '6.43 (best of 5; 6.61 ± 0.16)'
  assert list(rows) == [('plain', '20'), ('plain', '56'), ('ResNet', '20'), ('ResNet', '56'),
                        ('ResNet', '110')]


def test_runs_that_differ_beyond_the_seed_are_other_nets(tmp_path):
  write_population(str(tmp_path / 'depth20'), 20, seeds=2)
  lr = base_config(20, False, 0)
  lr['optimizer']['learning_rate'] = 0.05
  write_run(str(tmp_path / 'plain20_lr'), lr)
  out = report.write_report(str(tmp_path))
  rows = table(os.path.join(out, 'table6.md'))
  assert rows[('plain (optimizer.learning_rate=0.05)', '20')]['seeds'] == '1'
  assert rows[('plain (optimizer.learning_rate=0.1)', '20')]['seeds'] == '2'
  assert rows[('ResNet', '20')]['seeds'] == '2'


def test_every_net_over_its_seeds_with_the_median_seed(mixed, tmp_path):
  rows = table(os.path.join(mixed['out'], 'nets.md'))
  names = ['residualTrue_seed0', 'residualTrue_seed1', 'residualTrue_seed2', 'resnet20']
  errors = {name: mixed['finished'][name]['test/error'] for name in names}
  row = rows[('ResNet-20', '4')]
  assert row['test error (%)'] == pm(list(errors.values()))
  median = sorted(errors, key=errors.get)[1]  # The lower of the two middle ones.
  assert row['median seed'] == (median if median == 'resnet20' else f'depth20/{median}')
  # Any model: a LeNet-5 population of 5 seeds, no Figure 6 or Table 6.
  from configs import lenet  # pylint: disable=g-import-not-at-top
  errors = {}
  for seed in range(5):
    config = json.loads(lenet.get_config().to_json())
    config.update(seed=seed, population={'seeds': 1, 'vary': ''})
    config['train'].update(num_epochs=float(EPOCHS), eval_every_steps=0)
    result = write_run(str(tmp_path / 'lenet' / 'members' / f'seed{seed}'), config)
    errors[f'lenet/seed{seed}'] = result['test/error']
  (tmp_path / 'lenet' / 'results.json').write_text('{"members": {}}')
  out = report.write_report(str(tmp_path))
  row = table(os.path.join(out, 'nets.md'))[('lenet5, tanh', '5')]
  assert row['test error (%)'] == pm(list(errors.values()))
  assert row['best (%)'] == f'{100 * min(errors.values()):.2f}'
  assert row['median seed'] == sorted(errors, key=errors.get)[2]
  assert not os.path.exists(os.path.join(out, 'table6.md'))
  assert not os.path.exists(os.path.join(out, 'figure6.png'))


def test_an_unfinished_population_is_reported_unfinished(mixed):
  rows = table(os.path.join(mixed['out'], 'table6.md'))
  for method in ('plain', 'ResNet'):
    row = rows[(method, '56')]
    assert row['steps'] == '(unfinished)' and row['seeds'] == '2'
    # The numbers so far: the last evaluation of each member (epoch 2).
    errors = [made_up_error(56, method == 'ResNet', s, 2) for s in range(2)]
    assert row['test error (%)'] == pm(errors)
  board = open(os.path.join(mixed['out'], 'leaderboard.md')).read().splitlines()[2:]
  status = {row.split(' | ')[1]: row.split(' | ')[-1].strip(' |') for row in board}
  assert status['depth56/residualTrue_seed0'] == 'unfinished'  # Its own results.json aside.
  assert sorted(s for n, s in status.items() if n.startswith('depth56/')) == ['unfinished'] * 4
  # Alone, it is a report too.
  out = report.write_report(os.path.join(mixed['root'], 'depth56'))
  assert open(os.path.join(out, 'table6.md')).read().count('(unfinished)') == 2


def test_leaderboard_lists_every_member(mixed):
  board = open(os.path.join(mixed['out'], 'leaderboard.md')).read().splitlines()[2:]
  names = [row.split(' | ')[1] for row in board]
  assert len(names) == 6 + 4 + 2 and 'depth20/residualFalse_seed2' in names
  assert 'resnet110' in names and 'resnet20' in names
  best = min(r['test/error'] for r in [*mixed['finished'].values(), mixed['single']])
  assert board[0].startswith('| 1 | ') and f'| {100 * best:.2f} |' in board[0]
  seeds = {row.split(' | ')[1]: row.split(' | ')[3] for row in board}
  assert seeds['depth20/residualTrue_seed1'] == '1'


def test_error_against_epochs_per_net(mixed):
  rows = table(os.path.join(mixed['out'], 'epochs.md'))
  header = list(rows[('plain-20', '3')])
  assert list(rows)[2] == ('ResNet-20', '4')
  assert header[2:] == ['epoch 1', 'epoch 2', 'epoch 3', 'epoch 4']
  for epoch in (1, 2, 4):
    errors = [made_up_error(20, False, s, epoch) for s in range(3)]
    assert rows[('plain-20', '3')][f'epoch {epoch}'] == pm(errors)
  # The unfinished nets so far, the single run as its values.
  assert rows[('ResNet-56', '2')]['epoch 3'] == '-'
  assert rows[('ResNet-110', '1')]['epoch 4'] == f'{100 * made_up_error(110, True, 0, 4):.2f}'


def test_figure6_draws_the_mean_and_a_band_per_net(mixed):
  path = os.path.join(mixed['out'], 'figure6.png')
  assert os.path.getsize(path) > 10_000
  page = open(os.path.join(mixed['out'], 'README.md')).read()
  assert '![Figure 6](figure6.png)' in page and '## Test error against epochs' in page
  x, mean, low, high = report.curve(
      [r for r in report.load_runs(mixed['root']) if r['trial'] == 'depth20'
       and not r['config']['model']['residual']], 'test/error')
  errors = np.array([[made_up_error(20, False, s, e) for s in range(3)] for e in range(1, 5)])
  assert list(x) == [PER_EPOCH * e for e in range(1, 5)]
  np.testing.assert_allclose(mean, errors.mean(1))
  np.testing.assert_allclose(low, errors.min(1))
  np.testing.assert_allclose(high, errors.max(1))


def test_figure6_says_when_a_run_was_evaluated_once(tmp_path):
  """A net tested once (at its end) has no test curve to draw: its test error is a dot at that
  step, the legend says 'dot: the one test evaluation' (not only 'solid: test'), and the report
  says which nets."""
  for residual in (False, True):
    for seed in (0, 1):
      write_run(str(tmp_path / f'{"resnet" if residual else "plain"}20_{seed}'),
                base_config(20, residual, seed), eval_once=True)
  write_run(str(tmp_path / 'resnet56'), base_config(56, True, 0))  # Tested every epoch.
  nets = report.group_nets(report.load_runs(str(tmp_path)))
  notes = report.figure6(nets, str(tmp_path / 'f.png'))
  assert len(notes) == 1 and 'Evaluated once' in notes[0]
  assert 'plain-20 (step 1,560)' in notes[0] and 'ResNet-20 (step 1,560)' in notes[0]
  assert 'ResNet-56' not in notes[0]
  page = open(os.path.join(report.write_report(str(tmp_path)), 'README.md')).read()
  assert 'Note: Evaluated once, so no test curve' in page
  # Every net tested per epoch: no such note.
  assert report.figure6(report.group_nets(report.load_runs(str(tmp_path / 'resnet56'))),
                        str(tmp_path / 'g.png')) == []


def test_one_seed_twice_is_noted(tmp_path):
  write_population(str(tmp_path / 'depth20'), 20, seeds=2)
  write_run(str(tmp_path / 'resnet20'), base_config(20, True, 1))
  out = report.write_report(str(tmp_path))
  page = open(os.path.join(out, 'README.md')).read()
  assert 'ResNet-20: seed 1 ran 2 times (depth20/residualTrue_seed1, resnet20)' in page
  assert table(os.path.join(out, 'table6.md'))[('ResNet', '20')]['seeds'] == '3'


def test_gradient_norms_per_net_over_seeds(tmp_path):
  norms = {s: np.geomspace(1e-3 * (s + 1), 1e-1, 8) for s in range(3)}
  for activation in ('sigmoid', 'relu'):
    os.makedirs(tmp_path / f'{activation}8')
    for s in range(3):
      c = base_config(8, False, s)
      c['model'].update(activation=activation, batch_norm=False)
      write_run(str(tmp_path / f'{activation}8' / 'members' / f'seed{s}'), c,
                grad_norms=list(norms[s] * (1 if activation == 'relu' else 1e-6)))
    with open(tmp_path / f'{activation}8' / 'results.json', 'w') as f:
      json.dump({'step': EPOCHS * PER_EPOCH, 'members': {}}, f)
  out = report.write_report(str(tmp_path))
  rows = table(os.path.join(out, 'grad_norms.md'))
  relu = rows[('relu8', 'plain-8')]
  first = [norms[s][0] for s in range(3)]
  assert relu['seeds'] == '3'
  assert relu['first-layer grad norm'] == (
      f'{np.mean(first):.3g} ({min(first):.3g}-{max(first):.3g})')
  ratio = [norms[s][0] / norms[s][-1] for s in range(3)]
  assert relu['first / last'] == f'{np.mean(ratio):.3g} ({min(ratio):.3g}-{max(ratio):.3g})'
  assert ('sigmoid8', 'plain-8, sigmoid') in rows
  assert os.path.getsize(os.path.join(out, 'grad_norms.png')) > 10_000


# --- Sweep files of populations, through the sweep's command line and the config parser ---

def test_depth_ablation_trials_are_populations():
  trials = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py')))
  assert list(trials) == ['depth20', 'depth32', 'depth44', 'depth56', 'resnet110']
  assert trials['depth56'] == {'model.depth': 56, 'population.seeds': 5,
                               'population.vary': VARY}
  assert trials['resnet110']['population.seeds'] == 5
  assert 'population.vary' not in trials['resnet110']
  quick = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py:quick')))
  assert all(o['population.seeds'] == 3 and o['train.num_epochs'] == 3.0 for o in quick.values())
  single = dict(sweep.load_trials(
      os.path.join(ROOT, 'experiments/depth_ablation.py:single,quick')))
  assert 'plain56' in single and 'resnet110' in single and len(single) == 9
  assert not any('population.seeds' in o for o in single.values())
  acts = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/activations.py')))
  assert len(acts) == 9 and all(o['population.seeds'] == 3 for o in acts.values())
  cpu = dict(sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py:cpu')))
  assert list(cpu) == ['depth20', 'depth56']  # Plain and residual twins x 2 seeds at each.
  assert all(o['population.seeds'] == 2 and o['population.vary'] == VARY
             and o['dataset.name'] == 'cifar10_6k' for o in cpu.values())  # Offline.
  with pytest.raises(errors.UserError, match='expected no arg, or cpu, quick, single'):
    sweep.load_trials(os.path.join(ROOT, 'experiments/depth_ablation.py:fast'))


@pytest.mark.parametrize('sweep_file,vary', [
    ('experiments/depth_ablation.py:quick', VARY),
    ('two_fields.py', 'model.residual=False,True optimizer.learning_rate=0.1,0.05')])
def test_population_values_pass_through_the_sweep_and_the_override_parser(
    sweep_file, vary, tmp_path):
  if sweep_file == 'two_fields.py':  # Two items: a space inside the value too.
    sweep_file = str(tmp_path / sweep_file)
    with open(sweep_file, 'w') as f:
      f.write('def get_trials(arg=None):\n'
              f'  return [("depth56", {{"model.depth": 56, "population.seeds": 3, '
              f'"train.num_epochs": 3.0, "population.vary": {vary!r}}})]\n')
  out = subprocess.run(
      [sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py', f'--sweep={sweep_file}',
       f'--workdir={tmp_path}/runs', '--dry_run', '--only=depth56'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  (line,) = [l for l in out.stdout.splitlines() if 'cvjax.main' in l]
  argv = shlex.split(line)  # The printed command, as a shell would split it.
  assert f'--config.population.vary={vary}' in argv and '--config.population.seeds=3' in argv
  # The same arguments through ml_collections' parser, as cvjax.main reads them. Until
  # configs/common.py has `population`, a wrapper adds the field.
  wrapper = tmp_path / 'with_population.py'
  wrapper.write_text(
      'import ml_collections\nfrom configs import resnet\n\n'
      'def get_config(arg=None):\n'
      '  c = resnet.get_config(arg)\n'
      '  if "population" not in c:\n'
      '    c.population = ml_collections.ConfigDict({"seeds": 1, "vary": ""})\n'
      '  return c\n')
  main_argv = ['main', f'--config={wrapper}', *[a for a in argv if a.startswith('--config.')]]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                           sys_argv=main_argv)
  values(main_argv)
  config = holder.value
  assert config.population.vary == vary and config.population.seeds == 3
  assert config.model.depth == 56 and config.train.num_epochs == 3.0


def damaged(tmp_path, name):
  """A folder for each way the report's input can be wrong."""
  if name == 'missing':
    return tmp_path / 'nowhere'
  if name == 'file':
    (tmp_path / 'a_file').write_text('x')
    return tmp_path / 'a_file'
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text('{"step": 1}\n')
  (run / 'config.json').write_text('{}')
  if name == 'binary':
    (run / 'metrics.jsonl').write_bytes(bytes(range(256)) * 4)
  elif name == 'garbage':
    (run / 'config.json').write_text('garbage{')
  elif name == 'array':
    (run / 'metrics.jsonl').write_text('{"step": 1}\n[1, 2]\n')
  return run


@pytest.mark.parametrize('name,message', [
    ('missing', r'nowhere does not exist\. Expected a run'),
    ('file', r'a_file is a file, not a folder\. Expected a run'),
    ('binary', r'cannot read .*metrics\.jsonl: not UTF-8 text'),
    ('garbage', r'config\.json is not valid JSON \(Expecting value'),
    ('array', r'metrics\.jsonl, line 2 holds a JSON list, expected an object'),
])
def test_bad_report_input_is_one_paragraph_and_exit_2(tmp_path, name, message):
  out = subprocess.run([sys.executable, '-m', 'cvjax.tools.report', str(damaged(tmp_path, name))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert re.match('cvjax.tools.report: error: .*' + message, out.stderr), out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_report_help_and_usage():
  out = subprocess.run([sys.executable, '-m', 'cvjax.tools.report', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert 'usage: python -m cvjax.tools.report SWEEP_DIR|RUN_DIR' in out.stdout
  assert 'figure6.png' in out.stdout  # What it writes.
  out = subprocess.run([sys.executable, '-m', 'cvjax.tools.report'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'expected one folder' in out.stderr, out.stderr[-2000:]
