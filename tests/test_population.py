"""Populations (cvjax/population.py): each member equals the same run trained alone."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, child_env, tiny_config
from cvjax import evaluate, experiment, population, train
from cvjax.errors import UserError


def population_config(idx_dir, seeds=2, vary='', **overrides):
  c = tiny_config(idx_dir, **overrides)
  c.population.seeds = seeds
  c.population.vary = vary
  return c


def test_members_are_named_configs_of_their_own(idx_dir):
  c = population_config(idx_dir, seeds=2, vary='model.residual=False,True')
  c.seed = 7
  members = population.members(c)
  assert [m.name for m in members] == ['residualFalse_seed7', 'residualFalse_seed8',
                                       'residualTrue_seed7', 'residualTrue_seed8']
  assert [(m.config.seed, m.config.model.residual) for m in members] == [
      (7, False), (8, False), (7, True), (8, True)]
  assert all(not population.is_population(m.config) for m in members)
  groups = population.group_members(members)
  assert [[m.name for m in g] for g in groups] == [
      ['residualFalse_seed7', 'residualFalse_seed8'], ['residualTrue_seed7', 'residualTrue_seed8']]
  lr = population.members(population_config(idx_dir, seeds=1,
                                            vary='optimizer.learning_rate=0.1,0.05'))
  assert [m.config.optimizer.learning_rate for m in lr] == [0.1, 0.05]


@pytest.mark.parametrize('vary, message', [
    ('train.batch_size=8,16', 'shared by every member'),
    ('model.residul=False,True', 'does not have'),
    ('model.residual=0,1', 'holds a bool'),
    ('model.residual', 'expected FIELD=V1,V2'),
    ('model.depth=8,8', 'repeats a value'),
])
def test_bad_vary_is_a_clear_error(idx_dir, vary, message):
  with pytest.raises(UserError, match=message):
    population.members(population_config(idx_dir, vary=vary))


@pytest.mark.parametrize('vary, seed, message', [
    ('optimizer.learning_rate=0.1,-0.1', 0,
     r'population member learning_rate-0.1_seed0: optimizer.learning_rate=-0.1; expected a '
     'positive'),
    ('optimizer.momentum=0.9,1.5', 0, r'member momentum1.5_seed0: optimizer.momentum=1.5'),
    ('schedule.decay_factor=0.1,-0.5', 0, r'member decay_factor-0.5_seed0: schedule.decay_factor'),
    ('optimizer.learning_rate=0.1,1e999', 0, r'member learning_rateinf_seed0: '
     r'optimizer.learning_rate=inf'),
    ('', 2 ** 31 - 1, r'member seed2147483648: seed=2147483648; expected an integer in \[0, '
     r'2147483647\]'),
    ('schedule.warmup_steps=0,1.5', 0, r'schedule.warmup_steps=.1.5. has type float; the field '
     'holds a int'),
])
def test_each_member_gets_the_checks_of_its_run_alone(idx_dir, vary, seed, message):
  c = population_config(idx_dir, seeds=2, vary=vary)
  c.seed = seed
  with pytest.raises(UserError, match=message):
    population.members(c)


@pytest.mark.parametrize('vary, overrides, message', [
    ('schedule.decay_factor=0.1,0.5', {'schedule.name': 'cosine'},
     "schedule.decay_factor is not read by schedule.name='cosine'"),
    ('optimizer.b1=0.9,0.95', {}, "optimizer.b1 is not read by optimizer.name='sgd'"),
    ('optimizer.trust_coefficient=0.001,0.01', {'optimizer.name': 'adamw'},
     "optimizer.trust_coefficient is not read by optimizer.name='adamw'"),
    ('optimizer.nesterov=False,True', {'optimizer.momentum': 0.0},
     'optimizer.nesterov is not read with optimizer.momentum=0'),
    ('optimizer.decay_bn_and_bias=False,True', {'optimizer.weight_decay': 0.0},
     'optimizer.decay_bn_and_bias is not read with optimizer.weight_decay=0'),
    ('optimizer.name=sgd,adamw optimizer.b1=0.9,0.95', {},
     'member namesgd_b10.9_seed0: optimizer.b1 is not read'),
])
def test_a_varied_field_the_run_does_not_read_is_refused(idx_dir, vary, overrides, message):
  c = population_config(idx_dir, seeds=1, vary=vary)
  for field, value in overrides.items():
    section, key = field.split('.')
    c[section][key] = value
  with pytest.raises(UserError, match=message):
    population.members(c)
  # What the run does read is accepted: b1 under adamw, decay_factor under piecewise.
  population.members(population_config(idx_dir, seeds=1, vary='schedule.decay_factor=0.1,0.5'))
  a = population_config(idx_dir, seeds=1, vary='optimizer.b1=0.9,0.95')
  a.optimizer.name = 'adamw'
  assert [m.config.optimizer.b1 for m in population.members(a)] == [0.9, 0.95]


def test_a_bad_member_stops_the_run_before_anything_is_written(idx_dir, tmp_path):
  c = population_config(idx_dir, seeds=1, vary='optimizer.learning_rate=0.1,-0.1')
  with pytest.raises(UserError, match='member learning_rate-0.1_seed0'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_bad_seeds_is_a_clear_error(idx_dir):
  with pytest.raises(UserError, match='population.seeds'):
    population.members(population_config(idx_dir, seeds=0))


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize('split', [False, True])
def test_each_member_equals_its_run_alone(idx_dir, tmp_path, split):
  """Plain and residual twins x 2 seeds in one program (or its forward and backward as two):
  every member's parameters, BatchNorm statistics, optimizer state and test metrics after 12
  SGD steps are those of its config trained alone, to float tolerance."""
  c = population_config(idx_dir, seeds=2, vary='model.residual=False,True',
                        **{'train.split_backward': split})
  pop_state, pop_metrics = train.train_and_evaluate(c, str(tmp_path / 'pop'))
  s = experiment.build(c)
  states = s.by_member_of_groups(jax.device_get(pop_state))
  assert set(pop_metrics) == set(states) == {m.name for m in s.members}
  for m in s.members:
    alone_state, alone_metrics = train.train_and_evaluate(m.config, str(tmp_path / m.name))
    for a, b in zip(leaves(states[m.name]), leaves(alone_state)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for k, v in alone_metrics.items():
      np.testing.assert_allclose(pop_metrics[m.name][k], v, rtol=1e-4, atol=1e-6)
    # The member's folder is laid out as its run alone.
    ours = json.load(open(tmp_path / 'pop' / 'members' / m.name / 'results.json'))
    alone = json.load(open(tmp_path / m.name / 'results.json'))
    assert set(ours) == set(alone) and ours['num_mistakes'] == alone['num_mistakes']
    rows = lambda d: [(r['step'], sorted(r)) for r in map(json.loads, open(d / 'metrics.jsonl'))]
    assert rows(tmp_path / 'pop' / 'members' / m.name) == rows(tmp_path / m.name)
    assert json.load(open(tmp_path / 'pop' / 'members' / m.name / 'config.json'))['seed'] == \
        m.config.seed
  # Not one net four times: seeds start apart, twins (same seed, same start) train apart.
  kernel = lambda name: leaves(states[name].params)[-1]
  assert not np.allclose(kernel('residualFalse_seed0'), kernel('residualFalse_seed1'))
  assert not np.allclose(kernel('residualFalse_seed0'), kernel('residualTrue_seed0'))
  summary = json.load(open(tmp_path / 'pop' / 'results.json'))
  for net, names in s.nets().items():
    errors = [pop_metrics[n]['test/error'] for n in names]
    np.testing.assert_allclose(summary['groups'][net]['mean']['test/error'], np.mean(errors),
                               rtol=1e-6)


@pytest.mark.slow
def test_a_resumed_population_equals_an_uninterrupted_one(idx_dir, tmp_path):
  c = population_config(idx_dir, seeds=3)
  run = tmp_path / 'run'
  whole, metrics = train.train_and_evaluate(c, str(run))
  # Interrupted after the step-4 checkpoint: the resumed run redoes steps 5-12 bit for bit.
  for step in ('8', '12'):
    shutil.rmtree(run / 'checkpoints' / step)
  os.remove(run / 'results.json')
  resumed, again = train.train_and_evaluate(c, str(run))
  for a, b in zip(leaves(whole), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert again == metrics
  rows = [json.loads(l) for l in open(run / 'members' / 'seed2' / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'train/loss' in r] == [4, 8, 12]
  # Finished: a re-run trains nothing and returns every member's metrics.
  assert train.train_and_evaluate(c, str(run))[1] == metrics
  # cvjax.evaluate takes a member: its metrics are the population's for it.
  os.remove(run / 'members' / 'seed1' / 'error_analysis' / 'confusion.png')
  one, analysis = evaluate.evaluate_checkpoint(c, str(run), member='seed1')
  assert one == pytest.approx(metrics['seed1'], rel=1e-6) and analysis['step'] == 12
  assert os.path.exists(run / 'members' / 'seed1' / 'error_analysis' / 'confusion.png')
  with pytest.raises(UserError, match='seed0, seed1, seed2'):
    evaluate.evaluate_checkpoint(c, str(run))
  with pytest.raises(UserError, match='seed0, seed1, seed2'):
    evaluate.evaluate_checkpoint(c, str(run), member='seed9')


def test_a_population_on_streamed_data_is_a_clear_error(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    for cls in ('a', 'b'):
      os.makedirs(tmp_path / split / cls)
      for i in range(2):
        Image.new('RGB', (12, 12), (i * 100, 0, 0)).save(tmp_path / split / cls / f'{i}.png')
  c = population_config(str(tmp_path), **{'train.batch_size': 2, 'train.eval_batch_size': 2})
  c.dataset.pipeline = 'streaming'
  with pytest.raises(UserError, match='held on the device'):
    experiment.build(c)


@pytest.mark.slow
def test_eight_devices_agree_with_one(idx_dir, tmp_path):
  """On 8 simulated devices, 8 members are split over the devices (a member's batch whole on
  its device; 3 steps per call, two calls) and 2 members each have their batch split over the
  devices; both give the parameters of the same population on one device. Logs, evaluations
  and checkpoints fall on call boundaries (steps 3 and 6), so the 3-step call is the one
  program the members-over-devices run compiles."""
  script = f'''
import jax, numpy as np
from conftest import ROOT, child_env, tiny_config
from cvjax import experiment, population, train
assert len(jax.devices()) == 8
def config(seeds, vary):
  c = tiny_config({idx_dir!r}, **{{'train.num_steps': 6, 'train.native_conv': False,
                                   'train.log_every_steps': 3, 'train.eval_every_steps': 6,
                                   'train.checkpoint_every_steps': 6}})
  c.population.seeds, c.population.vary = seeds, vary
  return c
for seeds, vary, split in ((8, '', True), (1, 'model.residual=False,True', False)):
  c = config(seeds, vary)
  assert population.member_sharding(experiment.build(c)) == split
  one, m1 = train.train_and_evaluate(c, {str(tmp_path)!r} + f'/one{{seeds}}',
                                     devices=jax.devices()[:1])
  c.train.steps_per_call = 3 if split else 1  # Steps per call with members over the devices.
  eight, m8 = train.train_and_evaluate(c, {str(tmp_path)!r} + f'/eight{{seeds}}')
  kernel = eight['group0'].params['head']['kernel']
  assert kernel.sharding.mesh.size == 8
  assert (*kernel.sharding.spec, None)[0] == ('data' if split else None), kernel.sharding.spec
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               *[{{k: (s.params, s.model_state) for k, s in st.items()}}
                 for st in jax.device_get((one, eight))])
  for name in m1:
    np.testing.assert_allclose(m1[name]['test/loss'], m8[name]['test/loss'], rtol=1e-4)
print('AGREE')
'''
  env = child_env(XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and 'AGREE' in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize('seeds', [1, 2])
@pytest.mark.slow
def test_several_steps_per_call_equal_single_steps(idx_dir, tmp_path, seeds):
  """train.steps_per_call=5: a lax.scan of 5 steps per dispatch gives the states and the
  logged metrics of single steps (one run and a population); logs, evaluations and checkpoints
  stay at their steps (4, 6, 8, 12: calls of 4, 2, 2, 4 steps)."""
  runs = {}
  for k in (1, 5):
    c = population_config(idx_dir, seeds=seeds, **{'train.steps_per_call': k,
                                                    'train.split_backward': False})
    runs[k] = train.train_and_evaluate(c, str(tmp_path / f'k{k}'))
  for a, b in zip(leaves(runs[1][0]), leaves(runs[5][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  member = 'seed1' if seeds > 1 else ''
  rows = {k: [json.loads(l) for l in open(tmp_path / f'k{k}' / 'members' / member /
                                          'metrics.jsonl' if member else
                                          tmp_path / f'k{k}' / 'metrics.jsonl')] for k in (1, 5)}
  assert [r['step'] for r in rows[1]] == [r['step'] for r in rows[5]]
  for a, b in zip(rows[1], rows[5]):
    for key in ('train/loss', 'train/error', 'test/loss', 'train/learning_rate'):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
  assert sorted(int(p) for p in os.listdir(tmp_path / 'k5' / 'checkpoints')) == [4, 8, 12]


def test_steps_per_call_is_checked(idx_dir):
  with pytest.raises(UserError, match='train.steps_per_call=0'):
    experiment.build(population_config(idx_dir, seeds=1, **{'train.steps_per_call': 0}))


@pytest.mark.slow
def test_sigterm_stops_a_population_with_a_checkpoint_and_resume_is_uninterrupted(idx_dir,
                                                                                  tmp_path):
  """cvjax.main with a population and 3 steps per call, SIGTERM after the first call: exit 75
  after a checkpoint; the resumed population equals the uninterrupted one bit for bit, and each
  member's metrics.jsonl has each logged step once. Logs every 3 steps, evaluations and
  checkpoints every 6: every call is 3 steps, one program (calls of other lengths are
  test_several_steps_per_call_equal_single_steps')."""
  overrides = {'train.num_steps': 12, 'train.steps_per_call': 3, 'population.seeds': 2,
               'train.log_every_steps': 3, 'train.eval_every_steps': 6,
               'train.checkpoint_every_steps': 6}
  whole, _ = train.train_and_evaluate(population_config(idx_dir, **{
      k: v for k, v in overrides.items() if k.startswith('train.')}), str(tmp_path / 'whole'))
  flags = {'dataset.name': '', 'dataset.path': idx_dir, 'input.crop_padding': 2,
           'train.batch_size': 16, 'train.eval_batch_size': 16, **overrides}
  run = tmp_path / 'run'
  proc = subprocess.Popen([sys.executable, '-m', 'cvjax.main', '--config=configs/resnet.py:resnet8',
                           f'--workdir={run}', *(f'--config.{k}={v}' for k, v in flags.items())],
                          cwd=ROOT, text=True, stderr=subprocess.PIPE, env=child_env())
  log = []
  for line in proc.stderr:
    log.append(line)
    if 'First step' in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait() == 75, ''.join(log)[-3000:]
  stopped = max(int(d) for d in os.listdir(run / 'checkpoints') if d.isdigit())
  assert 3 <= stopped < 12
  resumed, _ = train.train_and_evaluate(population_config(idx_dir, **{
      k: v for k, v in overrides.items() if k.startswith('train.')}), str(run))
  for a, b in zip(leaves(whole), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  for member in ('seed0', 'seed1'):
    rows = [json.loads(l) for l in open(run / 'members' / member / 'metrics.jsonl')]
    assert [r['step'] for r in rows if 'train/loss' in r] == [3, 6, 9, 12]
    assert [r['step'] for r in rows if 'test/loss' in r] == [6, 12]


@pytest.mark.slow
def test_a_twin_population_reports_each_net_on_its_own(idx_dir, tmp_path, caplog):
  """Plain and residual twins x 2 seeds: the progress lines, the `Finished` line,
  results.json and the HParams give each net (its config without the seed) as mean ± std over
  its own seeds, never one mean over both nets."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  c = population_config(idx_dir, seeds=2, vary='model.residual=False,True',
                        **{'train.num_steps': 4, 'train.eval_every_steps': 4})
  caplog.set_level('INFO')
  _, metrics = train.train_and_evaluate(c, str(tmp_path))
  summary = json.load(open(tmp_path / 'results.json'))
  nets = {'residualFalse': ['residualFalse_seed0', 'residualFalse_seed1'],
          'residualTrue': ['residualTrue_seed0', 'residualTrue_seed1']}
  assert 'mean' not in summary and set(summary['groups']) == set(nets)
  for net, names in nets.items():
    errors = [metrics[n]['test/error'] for n in names]
    group = summary['groups'][net]
    assert group['members'] == names
    np.testing.assert_allclose(group['mean']['test/error'], np.mean(errors), rtol=1e-6)
    np.testing.assert_allclose(group['std']['test/error'], np.std(errors, ddof=1), rtol=1e-6)
  text = caplog.text
  finished = next(l for l in text.splitlines() if 'Finished resnet_cifar' in l)
  for net in nets:
    g = summary['groups'][net]
    assert (f'{net}: {100 * g["mean"]["test/error"]:.2f} ± {100 * g["std"]["test/error"]:.2f}% '
            '(2 seeds)') in finished
  # Before the first progress line, the log says what the run is doing.
  said = [text.index(m) for m in ('Reading the data and building resnet_cifar',
                                  'Initialising the parameters (compiling the initialiser of 4 '
                                  'members)', 'Compiling the train step', 'step 4/4')]
  assert said == sorted(said)
  progress = [l for l in text.splitlines() if 'step 4/4' in l]
  assert len(progress) == 2  # The train line and the test line.
  for line in progress:
    assert 'residualFalse: loss' in line and '| residualTrue: loss' in line
    assert line.count('(2 seeds)') == 2 and ' ± ' in line
  events = event_accumulator.EventAccumulator(
      str(tmp_path / 'members' / 'residualTrue_seed1' / 'hparams'))
  events.Reload()
  content = b''.join(events.PluginTagToContent('hparams').values())
  assert b'population.group' in content and b'residualTrue' in content
