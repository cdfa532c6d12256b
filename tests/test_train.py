import ast
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, child_env, tiny_config
from cvjax import config_help, experiment, memory_estimate, models, steps, train
from cvjax.data import memory, transforms


def read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_training_drives_the_loss_down_and_eval_counts_each_example_once(idx_dir, tmp_path):
  # Crops would shift the bars into each other's rows: off here.
  config = tiny_config(idx_dir, **{'train.num_steps': 30, 'train.eval_every_steps': 30,
                                   'schedule.name': 'constant', 'input.crop_padding': 0})
  state, test = train.train_and_evaluate(config, str(tmp_path))
  losses = [r['train/loss'] for r in read_jsonl(tmp_path) if 'train/loss' in r]
  assert losses[-1] < 0.5 * losses[0], losses

  # 40 test examples in batches of 16: 48 slots, 8 of them padding, each example once.
  assert test['test/count'] == 40
  # The same error from one un-batched forward pass over the whole test set.
  data = memory.load(config.dataset)
  mean, std = memory.normalization_stats(data.train_images, config.input.normalization)
  model = models.create_model(config.model, num_classes=10, dtype=jnp.float32)
  logits = jax.jit(model.apply)({'params': state.params, **state.model_state},  # One program.
                                transforms.normalize(data.test_images, mean, std))
  np.testing.assert_allclose(test['test/error'], np.mean(np.argmax(logits, -1) != data.test_labels),
                             atol=1e-6)
  assert test['test/error'] < 0.5  # Bars are easy: chance is 0.9.


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(idx_dir, tmp_path):
  config = tiny_config(idx_dir)  # 12 steps, 6 per epoch, checkpoints every 4.
  full, _ = train.train_and_evaluate(config, str(tmp_path / 'full'))

  # Interrupt: a run that died after its step-4 checkpoint (later ones lost).
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  for step in ('8', '12'):
    shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / step)
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 12
  assert_trees_close(full.params, resumed.params, rtol=1e-6, atol=1e-7)
  assert_trees_close(full.model_state, resumed.model_state, rtol=1e-6, atol=1e-7)
  # metrics.jsonl holds each step once, in order.
  steps = [r['step'] for r in read_jsonl(tmp_path / 'resumed') if 'train/loss' in r]
  assert steps == [4, 8, 12]


@pytest.mark.slow
def test_one_device_and_eight_devices_agree(idx_dir, tmp_path):
  """Same global batch on a 1-device and an 8-device mesh gives the same parameters, with
  XLA's convolutions on one device as the reference and oneDNN's (where the library builds)
  on eight: each simulated device runs its own custom calls, at the same time."""
  script = f'''
import jax, numpy as np
from conftest import tiny_config
from cvjax import train
assert len(jax.devices()) == 8
config = tiny_config({idx_dir!r}, **{{'train.num_steps': 6}})
xla = tiny_config({idx_dir!r}, **{{'train.num_steps': 6, 'train.native_conv': False}})
one, m1 = train.train_and_evaluate(xla, {str(tmp_path / 'one')!r}, devices=jax.devices()[:1])
eight, m8 = train.train_and_evaluate(config, {str(tmp_path / 'eight')!r})
assert eight.params['head']['kernel'].sharding.mesh.size == 8
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
             jax.device_get((one.params, one.model_state)),
             jax.device_get((eight.params, eight.model_state)))
np.testing.assert_allclose(m1['test/loss'], m8['test/loss'], rtol=1e-4)
print('AGREE')
'''
  env = child_env(XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and 'AGREE' in out.stdout, out.stderr[-3000:]


def run_main(workdir, *overrides, config='configs/resnet.py:resnet8'):
  return subprocess.run(
      [sys.executable, '-m', 'cvjax.main', f'--config={config}', f'--workdir={workdir}',
       *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_end_to_end_writes_workdir(tmp_path):
  from conftest import bars, write_idx  # pylint: disable=g-import-not-at-top
  data = tmp_path / 'digits'
  write_idx(data, *bars(64, size=28), 'train')
  write_idx(data, *bars(20, size=28, seed=1), 't10k')
  workdir = tmp_path / 'run'
  out = run_main(workdir, f'--config.dataset.path={data}', '--config.train.num_steps=8',
                 '--config.train.batch_size=16', '--config.train.log_every_steps=4',
                 '--config.train.eval_batch_size=8', config='configs/lenet.py')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 8/8' in out.stderr and 'img/s' in out.stderr and 'ETA' in out.stderr
  assert "Unable to initialize backend 'tpu'" not in out.stderr  # No TPU here: no note.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert json.load(open(workdir / 'config.json'))['model']['name'] == 'lenet5'
  assert os.listdir(workdir / 'checkpoints') == ['8']
  records = read_jsonl(workdir)
  tags = set().union(*records)
  assert {'step', 'train/loss', 'train/error', 'train/learning_rate', 'train/images_per_second',
          'test/loss', 'test/error', 'test/top5_error'} <= tags
  # The event file holds the same scalars (read back with TensorBoard's own reader).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  assert {'train/loss', 'test/error', 'test/top5_error'} <= set(events.Tags()['scalars'])
  assert [e.step for e in events.Scalars('train/loss')] == [4, 8]


BAD_INPUTS = [
    (['--config.dataset.path=', '--config.dataset.name=places365'], 'unknown dataset.name'),
    (['--config.dataset.path={tmp}/missing'], 'does not exist'),
    (['--config.dataset.path={tmp}/broken'], 'train-labels-idx1-ubyte.gz'),
    (['--config.dataset.path=', '--config.dataset.data_dir={tmp}/empty',
      '--config.dataset.download=False'], 'not available in data_dir'),
    (['--config.model.depth=19'], 'must be 6n\\+2'),
    (['--config.model.activation=softsign'], "unknown model.activation='softsign'"),
    (['--config.train.batch_size=0'], 'positive multiple'),
]


@pytest.mark.slow
@pytest.mark.parametrize('overrides,message', BAD_INPUTS)
def test_bad_input_gives_a_clear_error(idx_dir, tmp_path, overrides, message):
  (tmp_path / 'broken').mkdir()
  shutil.copy(os.path.join(idx_dir, 'train-images-idx3-ubyte.gz'), tmp_path / 'broken')
  overrides = [f'--config.dataset.path={idx_dir}', '--config.train.batch_size=16'] + [
      o.format(tmp=tmp_path) for o in overrides]
  out = run_main(tmp_path / 'run', *overrides)
  assert out.returncode != 0
  assert 'cvjax: error:' in out.stderr
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(message, out.stderr), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  # Printed once: not also as an absl error line.
  assert out.stderr.count('cvjax: error:') == 1 and not re.search(r'^E\d{4} ', out.stderr, re.M)


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_kept(idx_dir, tmp_path):
  workdir = tmp_path / 'run'
  common = [f'--config.dataset.path={idx_dir}', '--config.train.num_steps=2',
            '--config.train.batch_size=16', '--config.train.eval_batch_size=8']
  assert run_main(workdir, *common).returncode == 0
  before = sorted(os.listdir(workdir / 'checkpoints' / '2'))
  out = run_main(workdir, *common, '--config.model.residual=False')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'different model' in out.stderr and "residual" in out.stderr
  assert sorted(os.listdir(workdir / 'checkpoints' / '2')) == before
  assert os.listdir(workdir / 'checkpoints') == ['2']


@pytest.mark.parametrize('args,message', [
    (['--config=configs/resnet.py:resnet5x'], 'expected resnetN, plainN'),
    (['--config=configs/resnet.py', '--config.model.dpeth=56'], "did you mean 'model.depth'"),
    (['--config=configs/resnet.py', '--config.train.learning_rate=0.3'],
     "unknown config field 'train.learning_rate'; did you mean 'optimizer.learning_rate'?"),
    (['--config=configs/nope.py'], 'No such file'),
])
@pytest.mark.slow
def test_bad_config_flags_give_one_line(tmp_path, args, message):
  out = subprocess.run([sys.executable, '-m', 'cvjax.main', f'--workdir={tmp_path}', *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert 'cvjax: error:' in out.stderr and message in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_the_end_of_a_run_is_saved_first_and_a_finished_run_says_so(idx_dir, tmp_path, caplog,
                                                                    monkeypatch):
  """The final checkpoint is written before the final evaluation, so a run stopped during it
  keeps its steps; a re-run of the finished workdir trains nothing and says where it ended."""
  config = tiny_config(idx_dir)  # 12 steps; evaluations at 6 and 12.
  original = train.evaluate
  calls = []

  def evaluate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # The final evaluation: the run dies in it.
      raise KeyboardInterrupt
    return original(*args, **kwargs, progress_every_s=0)  # A progress note per batch.
  monkeypatch.setattr(train, 'evaluate', evaluate)
  caplog.set_level('INFO', logger='absl')
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  assert '12' in os.listdir(tmp_path / 'checkpoints')
  assert 'evaluating: 16/40 test images' in caplog.text  # Batches of 16.
  monkeypatch.setattr(train, 'evaluate', original)

  caplog.clear()  # The re-run evaluates the final checkpoint and finishes the run.
  state, test = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 12 and 'Resuming' not in caplog.text
  assert 'The checkpoint at step 12 is the last of this run; evaluating it.' in caplog.text
  results = json.load(open(tmp_path / 'results.json'))
  assert 'Finished resnet_cifar at step 12 in' in caplog.text
  assert f'test error {100 * results["test/error"]:.2f}% ({results["num_mistakes"]} of 40)' \
      in caplog.text

  caplog.clear()
  again, test_again = train.train_and_evaluate(config, str(tmp_path))
  assert 'This run already finished at step 12: test error' in caplog.text
  assert 'evaluating' not in caplog.text and test_again == test
  assert int(again.step) == 12


@pytest.mark.slow
def test_help_lists_the_fields_and_dry_run_prints_the_plan(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'cvjax.main', '--config=configs/lenet.py:quick',
                        '--help'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '--config.dataset.name="mnist10k"' in out.stdout
  assert '--config.input.crop_padding=0' in out.stdout and '0: off' in out.stdout  # Commented.
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, '-m', 'cvjax.main', '--config=configs/lenet.py:quick',
                        f'--workdir={workdir}', '--dry_run', '--config.train.num_epochs=2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '--config.train.num_epochs=2.0' in out.stdout  # The resolved config, with overrides.
  assert '(the config file sets 10.0)' in out.stdout  # Said beside the overridden field.
  assert '--config.schedule.boundaries=(0.5, 0.75)' in out.stdout and '!!python' not in out.stdout
  assert '8,000 training and 2,000 test images' in out.stdout
  assert '124 steps of 128 images = 2 epochs (62 steps an epoch' in out.stdout
  assert not workdir.exists()  # Nothing trained, nothing written.


CONFIGS = ['configs/lenet.py', 'configs/lenet.py:paper', 'configs/lenet.py:quick',
           'configs/alexnet.py', 'configs/alexnet.py:imagenet_torchvision',
           'configs/alexnet.py:cifar10', 'configs/vgg.py', 'configs/vgg.py:cifar10',
           'configs/vgg.py:imagenet_vgg11_bn', 'configs/vgg.py:cifar10_vgg19',
           'configs/resnet.py', 'configs/resnet.py:plain56', 'configs/resnet.py:quick',
           'configs/resnet.py:resnet110', 'configs/resnet.py:resnet20_modern',
           'configs/resnet.py:imagenet', 'configs/resnet.py:imagenet_plain50_v1.5',
           'configs/resnet.py:imagenet_resnet50_tv2', 'configs/resnet.py:imagenet_resnet50_mlperf']


@pytest.mark.parametrize('spec', CONFIGS)
def test_help_gives_every_field_the_comment_of_the_line_that_set_it(spec):
  """--help of every config: each field has a comment, and it is the one of the line that set
  the field's value for this config (that line, when a literal, holds this config's value),
  not another config's (LeNet's learning-rate note on a ResNet, 'Once per epoch' of the quick
  config's 39 steps on a 100), nor a fragment like '(said of int(match.group(2)))'."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    config = config_help.load_config(spec)  # As cvjax.main loads it.
    text = config_help.describe(config, spec)
    sources = config_help.field_sources(spec)
  finally:
    os.chdir(cwd)
  fields = config_help.flatten(config)
  lines = text.splitlines()
  assert len(lines) == len(fields)
  uncommented = [l.split('=')[0].strip() for l in lines if '  # ' not in l]
  assert not uncommented, f'{spec}: fields without a comment: {uncommented}'
  assert 'said of' not in text and '!!python' not in text
  for name, value in fields.items():
    _, _, assigned, _ = sources[name]
    try:
      literal = ast.literal_eval(assigned)
    except (ValueError, SyntaxError):
      continue  # Computed (e.g. from the arg): the line ran for this config, which is enough.
    assert literal == value or (assigned.startswith('config_dict.placeholder') and value is None),\
        (spec, name, assigned, value)
  if spec == 'configs/resnet.py':
    comment = lambda f: next(l for l in lines if l.startswith(f'  --config.{f}=')).split('# ', 1)[1]
    assert 'RBF' not in comment('optimizer.learning_rate')  # LeNet's note.
    assert 'epoch' not in comment('train.log_every_steps').lower()
    assert comment('model.depth').startswith('6n+2')


def test_bfloat16_on_a_cpu_is_named_slow(idx_dir, caplog):
  # On XLA's convolutions (oneDNN's bfloat16 ones are the fast path, where the CPU has them).
  caplog.set_level('WARNING', logger='absl')
  experiment.build(tiny_config(idx_dir, **{'train.compute_dtype': 'bfloat16',
                                           'train.native_conv': False}))
  assert "bfloat16 on a CPU with XLA's convolutions is slower than float32" in caplog.text
  caplog.clear()
  experiment.build(tiny_config(idx_dir))
  assert 'bfloat16' not in caplog.text


def test_split_backward_follows_the_backend_unless_the_config_sets_it(monkeypatch):
  from configs import lenet, resnet  # pylint: disable=g-import-not-at-top
  cifar, imagenet, one = resnet.get_config(), resnet.get_config('imagenet'), lenet.get_config()
  assert cifar.train.split_backward is None and one.train.split_backward is False
  assert jax.default_backend() == 'cpu'
  assert steps.split_backward(cifar) and steps.split_backward(imagenet)
  assert not steps.split_backward(one)  # LeNet-5 keeps one program.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not steps.split_backward(cifar) and not steps.split_backward(imagenet)
  cifar.train.split_backward = True
  assert steps.split_backward(cifar)


@pytest.mark.slow
@pytest.mark.parametrize('split', [True, False])
def test_the_train_step_is_traced_once_across_evaluations_and_a_resume(idx_dir, tmp_path,
                                                                       monkeypatch, split):
  # A second trace would mean a second compilation: e.g. a restored state whose shardings or
  # dtypes differ from what the step returns, or an evaluation that changed the state's.
  traces = []
  # The start-up memory estimate traces the step abstractly once, compiling nothing (tested in
  # test_reliability.py); counted here are the loop's traces.
  monkeypatch.setattr(memory_estimate, 'check', lambda exp: None)
  for name in ('train_forward', 'train_backward', 'train_step', 'eval_step'):
    original = getattr(steps, name)

    def counted(*args, _name=name, _original=original, **kwargs):
      traces.append(_name)
      return _original(*args, **kwargs)
    monkeypatch.setattr(steps, name, counted)
  kw = {'train.eval_every_steps': 2, 'train.checkpoint_every_steps': 2, 'train.log_every_steps': 2,
        'train.split_backward': split}
  names = {'train_forward', 'train_backward', 'eval_step'} if split else {'train_step',
                                                                           'eval_step'}
  train.train_and_evaluate(tiny_config(idx_dir, **kw, **{'train.num_steps': 4}), str(tmp_path))
  assert sorted(traces) == sorted(names), traces  # 4 steps, 2 evaluations: one trace each.
  traces.clear()
  state, _ = train.train_and_evaluate(tiny_config(idx_dir, **kw, **{'train.num_steps': 8}),
                                      str(tmp_path))  # Resumes from step 4.
  assert int(state.step) == 8 and sorted(traces) == sorted(names), traces
