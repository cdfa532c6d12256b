"""The (data, model) mesh: rules, equality with one device, collectives, restore across meshes.

The multi-device checks run in one child process with 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported); the child calls
the `_child_*` functions below, one after another, and each test reads its own's outcome. Small nets (a `width` below the paper's) keep them cheap.
"""

import functools
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, child_env, tiny_config
from cvjax import config_checks
from cvjax import sharding
from cvjax.errors import UserError

# Parameters after SGD steps on a mesh against one device: float32 sums in another order.
RTOL, ATOL = 1e-4, 1e-5


def run_child(calls, timeout=1500):
  """{name: output} of `calls` ({name: 'function(args)'}) run one after another in one child
  with 8 devices: one JAX start-up and one compilation cache for them all. A call that raised
  has 'CHECK FAILED' and its traceback in its output."""
  script = f'''
import traceback
import test_sharding as t
for name, call in {sorted(calls.items())!r}:
  print('=== CHECK', name, flush=True)
  try:
    eval('t.' + call)
    print('CHECK OK', flush=True)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc(file=__import__('sys').stdout)
    print('CHECK FAILED', flush=True)
print('=== CHILD DONE')
'''
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=child_env(
                           XLA_FLAGS='--xla_force_host_platform_device_count=8',
                           CVJAX_NATIVE='0'))
  sections = out.stdout.split('=== CHILD DONE')[0].split('=== CHECK ')[1:]
  outputs = {s.split('\n', 1)[0]: s.split('\n', 1)[1] for s in sections}
  return {name: outputs.get(name, f'(no output; exit {out.returncode})\n'
                            + (out.stdout + out.stderr)[-4000:]) for name in calls}


@pytest.fixture(scope='module')
def eight_devices(request, idx_dir, tmp_path_factory):
  """The outputs of the multi-device checks of the tests selected here, from one child."""
  workdir = str(tmp_path_factory.mktemp('meshes'))
  checks = {'test_alexnet_collectives_per_step': {'collectives': '_child_alexnet_collectives()'},
            'test_checkpoint_written_on_one_mesh_resumes_on_another': {
                'checkpoint': f'_child_checkpoint_across_meshes({idx_dir!r}, {workdir!r})'}}
  calls = {}
  for item in request.session.items:
    if item.module is request.module:
      if item.originalname == 'test_meshes_give_the_parameters_of_one_device':
        family = item.callspec.params['family']
        calls[f'mesh_{family}'] = f'_child_same_as_one_device({family!r})'
      calls.update(checks.get(item.originalname, {}))
  return run_child(calls)


def assert_check_ok(output):
  assert output.rstrip().endswith('CHECK OK'), output[-4000:]
  print(output)  # The differences seen (pytest -s shows them).


def _config(family, arg, model=1, fsdp=False):
  from configs import alexnet, resnet, vgg  # pylint: disable=g-import-not-at-top
  c = {'alexnet': alexnet, 'vgg': vgg, 'resnet': resnet}[family].get_config(arg)
  c.mesh.model, c.mesh.fsdp = model, fsdp
  c.train.split_backward = False  # One program: its collectives are the step's.
  return c


def _small_model(family, mesh):
  """Two-tower AlexNet and VGG-11 with BatchNorm (the papers' layers, 1/8 the width), and
  CIFAR ResNet-8 (a BatchNorm net without rules: the smallest that compiles quickly)."""
  from cvjax import models  # pylint: disable=g-import-not-at-top
  from cvjax.ops import convolution  # pylint: disable=g-import-not-at-top
  conv = sharding.grouped_per_device(convolution.conv_general_dilated, mesh)
  if family == 'alexnet':
    return models.AlexNet(num_classes=10, groups=2, width=1 / 8, conv_general_dilated=conv), 16
  if family == 'vgg':
    return models.VGG(depth=11, batch_norm=True, num_classes=10, width=1 / 8,
                      conv_general_dilated=conv), 32
  return models.CifarResNet(depth=8, num_classes=10, conv_general_dilated=conv), 16


ARGS = {'alexnet': 'cifar10', 'vgg': 'cifar10_vgg11', 'resnet': 'resnet8'}


def _dense(params):
  """The first dense layer's parameters: fc6 (AlexNet, VGG), else the head (ResNet-8)."""
  return params['fc6' if 'fc6' in params else 'head']


# The compiled train steps of this child by (family, devices, mesh.model, mesh.fsdp): the mesh
# checks and the collectives check read the same AlexNet programs, compiled once.
_PROGRAMS = {}


def _compiled_step(family, devices, model=1, fsdp=False, batch=16):
  """(compiled step, its state sharding, initial state, data, batch, rng) on a mesh."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from cvjax import jit_steps, optim, steps  # pylint: disable=g-import-not-at-top
  from cvjax.data import streaming  # pylint: disable=g-import-not-at-top
  config = _config(family, ARGS[family], model, fsdp)
  config.optimizer.learning_rate = 0.05
  mesh = sharding.make_mesh(config, devices)
  net, size = _small_model(family, mesh)
  tx = optim.make_optimizer(config.optimizer, optax.constant_schedule(0.05))
  init = steps.state_initializer(net, tx, (size, size, 3), jnp.float32)
  rng = jax.random.key(0)
  shardings = sharding.state_sharding(jax.eval_shape(init, rng), mesh, config)
  state = steps.init_state(init, rng, shardings)
  step = jit_steps.jit_train_step(net, tx, config, mesh, streaming.train_batch, shardings)
  data_rng = np.random.default_rng(0)
  by_data = NamedSharding(mesh, P('data'))
  images = data_rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = data_rng.integers(0, 10, batch).astype(np.int32)
  batch = jax.device_put({'images': images, 'labels': labels}, by_data)
  data = jax.device_put({'mean': np.zeros((1, 1, 1, 1), np.float32),
                         'std': np.ones((1, 1, 1, 1), np.float32)}, NamedSharding(mesh, P()))
  key = (family, len(devices), model, fsdp)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = step.lower(state, data, batch, rng).compile()
  return _PROGRAMS[key], shardings, state, data, batch, rng


def _sgd(family, devices, model=1, fsdp=False, steps=2):
  """(a dense kernel before, the train state after `steps` SGD steps)."""
  step, shardings, state, data, batch, rng = _compiled_step(family, devices, model, fsdp)
  before = np.array(_dense(state.params)['kernel'])
  for _ in range(steps):
    state, _ = step(state, data, batch, rng)
  assert jax.tree.map(lambda x: x.sharding, state) == shardings  # The step kept the layout.
  return before, state


# (mesh.model, mesh.fsdp) on 8 devices, one mesh per code path of cvjax.sharding. AlexNet's
# rules split its towers and classifier (over 2 and over 4: towers split further), with FSDP
# or not; (1, False) is data parallelism alone, (1, True) FSDP without rules (a model axis of 1
# applies none). VGG's rules are AlexNet's classifier rule alone: (2, True) checks them, with
# FSDP, after ungrouped convolutions and BatchNorm over a batch split 4 ways (its (2, False) and
# (1, True) would repeat AlexNet's; BatchNorm's parameters and statistics are below
# sharding.FSDP_MIN_SIZE, so FSDP leaves them whole). ResNet-8 has no rules, so a model axis
# only replicates it: that one mesh (data-only BatchNorm over 8 devices: test_train's).
MESHES = {'alexnet': ((1, False), (2, False), (4, False), (1, True), (2, True)),
          'vgg': ((2, True),),
          'resnet': ((2, False),)}


def _child_same_as_one_device(family):
  devices = jax.devices()
  assert len(devices) == 8
  before, one = _sgd(family, devices[:1])
  one = jax.device_get(one)
  assert not np.allclose(before, _dense(one.params)['kernel'], atol=1e-6)  # Training moved it.
  for model, fsdp in MESHES[family]:
    state = _sgd(family, devices, model, fsdp)[1]
    specs = {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda x: x.sharding, state.params))}
    if family in sharding.RULES and model > 1:  # The rules took effect.
      assert specs['fc6/kernel'][-1] == 'model', specs
    if fsdp:
      assert any('data' in s for s in specs.values()), specs
    got = jax.device_get(state)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                             (one.params, one.model_state),
                                             (got.params, got.model_state))))
    print(f'{family} mesh {8 // model}x{model} fsdp={fsdp}: max |diff| {worst:.2e}')
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL, atol=ATOL),
                 (one.params, one.model_state), (got.params, got.model_state))


@pytest.mark.slow
@pytest.mark.parametrize('family', ['alexnet', 'vgg', 'resnet'])
def test_meshes_give_the_parameters_of_one_device(eight_devices, family):
  """The meshes of MESHES (data x model, FSDP or not): same parameters and BatchNorm statistics
  as one device after 2 SGD steps with momentum (the second reads the first's momentum; and
  dropout: its bits do not depend on the mesh)."""
  assert_check_ok(eight_devices[f'mesh_{family}'])


# AlexNet's collectives per train step (XLA's convolutions, one program), from the compiled
# HLO. Cross-tower, as in the paper: conv3's and fc6's inputs gathered, fc7's partial sums
# all-reduced, and their gradients (conv3's, fc6's and fc8's inputs). The loss over logits
# split by class: reduce_max, reduce_sum and four gathers for the metrics. Local response
# normalisation runs over all 96 channels, across the towers' boundary: 8 halo exchanges (2
# channels each way, after conv1 and conv2, forward and backward). One all-reduce for the
# finiteness check and, with data > 1, one (combined) for the gradients over data. Data
# parallel alone (8x1): the gradients' all-reduce and the metrics' top-5 gather; XLA alone
# had gathered the whole batch for each grouped conv's kernel gradient (6 more all-gathers).
ALEXNET_COLLECTIVES = {
    (8, 1): {'all-reduce': 1, 'all-gather': 1, 'reduce-scatter': 0, 'collective-permute': 0,
             'all-to-all': 0},
    (1, 2): {'all-reduce': 7, 'all-gather': 6, 'reduce-scatter': 0, 'collective-permute': 8,
             'all-to-all': 0},
    (4, 2): {'all-reduce': 8, 'all-gather': 7, 'reduce-scatter': 0, 'collective-permute': 8,
             'all-to-all': 0},
}


def _child_alexnet_collectives():
  for (data, model), expected in ALEXNET_COLLECTIVES.items():
    step, _, state, batch_data, batch, rng = _compiled_step(
        'alexnet', jax.devices()[:data * model], model)
    text = step.as_text()
    counts = sharding.count_collectives(text)
    print(f'alexnet {data}x{model}: {counts}')
    assert counts == expected, (data, model, counts)
    # Inside the towers (conv2, conv4, conv5: grouped) no activation or kernel moves; only the
    # combined gradient all-reduce over data (its op_name lists many layers) mentions them.
    names = re.findall(r'\s(?:' + '|'.join(sharding.COLLECTIVES) +
                       r')(?:-start)?\(.*op_name="([^"]*)"', text)
    assert len(names) == sum(counts.values())
    tower = [n for n in names if re.search(r'/conv[245]/', n) and not n.startswith(
        'jit(train_step)/(')]
    assert not tower, tower


@pytest.mark.slow
def test_alexnet_collectives_per_step(eight_devices):
  assert_check_ok(eight_devices['collectives'])


def _child_checkpoint_across_meshes(data_dir, workdir):
  from cvjax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(data_dir, **{'train.num_steps': 8, 'train.checkpoint_every_steps': 4,
                                    'train.eval_every_steps': 8})
  config.mesh.fsdp = True
  a, _ = train.train_and_evaluate(config, os.path.join(workdir, 'a'))
  assert any('data' in x.sharding.spec for x in jax.tree.leaves(a.params))
  # The run again from a:'s step-4 checkpoint, on one device.
  shutil.copytree(os.path.join(workdir, 'a'), os.path.join(workdir, 'b'))
  shutil.rmtree(os.path.join(workdir, 'b', 'checkpoints', '8'))
  os.remove(os.path.join(workdir, 'b', 'results.json'))
  config.mesh.fsdp = False
  logged = []
  handler = logging.Handler()
  handler.emit = lambda record: logged.append(record.getMessage())
  logging.getLogger('absl').addHandler(handler)
  logging.getLogger('absl').setLevel(logging.INFO)
  b, _ = train.train_and_evaluate(config, os.path.join(workdir, 'b'),
                                  devices=jax.devices()[:1])
  assert 'Resuming from the checkpoint at step 4.' in logged, logged  # Not a fresh start.
  assert b.params['head']['kernel'].sharding.mesh.size == 1
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5),
               jax.device_get((a.params, a.model_state)), jax.device_get((b.params, b.model_state)))


@pytest.mark.slow
def test_checkpoint_written_on_one_mesh_resumes_on_another(eight_devices):
  """FSDP over 8 devices writes step 4; one device resumes it and ends where the 8 did."""
  assert_check_ok(eight_devices['checkpoint'])


def test_rules_split_towers_classifier_and_fsdp():
  mesh = AbstractMesh((4, 2), ('data', 'model'))
  rules = sharding.RULES['alexnet']
  spec = lambda path, shape, fsdp=False: sharding.partition_spec(path, shape, mesh, rules, fsdp)
  assert spec('params/conv2/kernel', (5, 5, 48, 256)) == P(None, None, None, 'model')
  assert spec('opt_state/1/0/trace/conv2/kernel', (5, 5, 48, 256)) == P(None, None, None,
                                                                         'model')
  assert spec('params/fc6/kernel', (9216, 4096)) == P(None, 'model')
  assert spec('params/fc7/kernel', (4096, 4096)) == P('model', None)
  assert spec('params/fc7/bias', (4096,)) == P(None)
  assert spec('params/fc8/kernel', (4096, 5)) == P(None, None)  # 5 classes: not divisible.
  # A leading member axis (populations) stays whole.
  assert spec('params/fc6/kernel', (3, 9216, 4096)) == P(None, None, 'model')
  assert spec('params/fc6/kernel', (9216, 4096), fsdp=True) == P('data', 'model')
  assert spec('params/fc7/kernel', (4096, 4096), fsdp=True) == P('model', 'data')
  assert spec('params/conv1/bias', (96,), fsdp=True) == P('model')  # Too small for FSDP.
  assert spec('model_state/batch_stats/bn/mean', (4096,), fsdp=True) == P(None)
  assert spec('step', ()) == P()


def test_state_bytes_per_device():
  from configs import alexnet  # pylint: disable=g-import-not-at-top
  from cvjax import experiment  # pylint: disable=g-import-not-at-top
  config = alexnet.get_config('imagenet')
  abstract = experiment.build_state(config, 1000, (227, 227, 3), 10)[-1]
  full = sharding.device_bytes(abstract, sharding.state_sharding(
      abstract, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'model')),
      config))
  # float32 parameters, momentum of the same size and the optimizer's int32 step count.
  assert full['params'] == 60_965_224 * 4 and full['opt_state'] == full['params'] + 4
  mesh = AbstractMesh((4, 2), ('data', 'model'))
  split = sharding.device_bytes(abstract, sharding.state_sharding(abstract, mesh, config))
  assert full['params'] / 2.1 < split['params'] < full['params'] / 1.9  # All but biases' few.


@pytest.mark.parametrize('mesh,message', [
    ({'model': 3}, 'mesh.model=3; expected a positive integer that divides the 8 devices'),
    ({'model': 0}, 'mesh.model=0'),
    ({'fsdp': 'yes'}, "mesh.fsdp='yes'; expected True"),
])
def test_bad_mesh_config_is_a_clear_error(mesh, message):
  config = _config('alexnet', 'cifar10')
  config.mesh = ml_collections.ConfigDict({'model': 1, 'fsdp': False, **mesh})
  with pytest.raises(UserError, match=message.replace('(', r'\(')):
    config_checks.check_mesh(config, 8)


def test_population_with_a_split_mesh_is_a_clear_error(idx_dir):
  from cvjax import experiment  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir, **{'population.seeds': 2, 'mesh.fsdp': True})
  with pytest.raises(UserError, match='a population'):
    experiment.build(config)
