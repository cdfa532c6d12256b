"""What a run settles from its devices (cvjax.experiment.with_devices): the evaluation batch
rounded up to fit the data axis, and train.compute_dtype='auto' by platform."""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, child_env, tiny_config
from configs import alexnet, resnet, vgg
from cvjax import experiment, sharding, steps

EVAL_CHILD = '''
import json
from absl import logging
import jax
from conftest import tiny_config
logging.set_verbosity(logging.INFO)  # As cvjax.main has it.
from cvjax import experiment, jit_steps, steps, train
out = {{}}
for n in (1, 8, 16):
  exp = experiment.build(tiny_config({idx_dir!r}, **{{'train.eval_batch_size': 10}}),
                         jax.devices()[:n])
  state = steps.init_state(exp.init, jax.random.key(0), jit_steps.state_sharding(exp))
  eval_step, test_data = jit_steps.jit_evaluation(exp)
  metrics, predictions, _ = train.evaluate(eval_step, state, test_data, exp.input.eval_batches(),
                                           exp.input.num_test, exp.input.num_classes)
  out[n] = {{'eval_batch_size': exp.config.train.eval_batch_size,
            'predictions': predictions[:, 0].tolist(),
            **{{k: float(v) for k, v in metrics.items()}}}}
print('RESULT', json.dumps(out))
'''


@pytest.mark.slow
def test_eval_batch_rounds_up_to_the_data_axis_with_the_same_metrics(idx_dir):
  """train.eval_batch_size=10 (as the default 250 on 8 devices, 1000 on 16) runs on 8 and 16
  devices as 16, and evaluates the 40 test images to the metrics of 1 device."""
  out = subprocess.run([sys.executable, '-c', EVAL_CHILD.format(idx_dir=idx_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=child_env(
                           XLA_FLAGS='--xla_force_host_platform_device_count=16',
                           CVJAX_NATIVE='0'))
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout.split('RESULT ')[1])
  assert [runs[n]['eval_batch_size'] for n in ('1', '8', '16')] == [10, 16, 16]
  assert 'train.eval_batch_size=10 rounded up to 16' in out.stderr
  for n in ('8', '16'):
    assert runs[n]['test/count'] == 40
    assert runs[n]['predictions'] == runs['1']['predictions']
    assert runs[n]['test/error'] == runs['1']['test/error']
    np.testing.assert_allclose(runs[n]['test/loss'], runs['1']['test/loss'], rtol=1e-5)


def _mesh(platform, devices):
  """A stand-in for a mesh of `devices` accelerators of `platform` (none exist here)."""
  return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]
                                                * devices), shape={'data': devices})


def imagenet_configs():
  return [resnet.get_config(a) for a in resnet.IMAGENET] + [
      alexnet.get_config('imagenet'), vgg.get_config('imagenet')]


def test_imagenet_configs_compute_in_bfloat16_on_accelerators_only():
  for c in imagenet_configs():
    assert c.train.compute_dtype == 'auto', c.model
  c = resnet.get_config('imagenet')
  for platform, dtype in (('gpu', 'bfloat16'), ('tpu', 'bfloat16'), ('cpu', 'float32')):
    settled = experiment.with_devices(c, _mesh(platform, 8))
    assert settled.train.compute_dtype == dtype
    assert settled.train.eval_batch_size == 256  # 250 on 8 devices.
  assert c.train.compute_dtype == 'auto' and c.train.eval_batch_size == 250  # As given.
  # The CIFAR recipes stay float32 everywhere, and a config that fits is returned as it is.
  cifar = resnet.get_config('resnet20')
  assert experiment.with_devices(cifar, _mesh('gpu', 8)) is cifar
  assert experiment.with_devices(cifar, _mesh('gpu', 16)).train.eval_batch_size == 1008


def test_bfloat16_compute_keeps_parameters_statistics_logits_and_loss_float32():
  """ResNet-50 as `auto` builds it on a GPU: the convolutions in bfloat16, everything that
  accumulates (parameters, optimizer state, BatchNorm statistics, logits, loss, gradients) in
  float32. Shapes only (jax.eval_shape): nothing runs."""
  c = experiment.with_devices(resnet.get_config('imagenet'), _mesh('gpu', 8))
  model, _, _, _, state = experiment.build_state(c, 1000, (224, 224, 3), 10)
  assert model.dtype == jnp.bfloat16
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)

  opts = steps.StepOptions(model=model, tx=None, batch_sharding=None, dtype=jnp.bfloat16,
                           make_train_batch=lambda data, batch, rng, **kw: data)

  def loss_and_grads(state, x, labels):
    backward, metrics, new_vars = steps.train_forward(state, (x, labels), None,
                                                      jax.random.key(0), opts)
    (grads,) = backward(jnp.ones((), jnp.float32))
    loss = metrics['loss'] / x.shape[0]
    logits = model.apply({'params': state.params, **state.model_state}, x, train=False)
    return loss, new_vars, grads, logits
  loss, new_vars, grads, logits = jax.eval_shape(loss_and_grads, state, x, labels)
  assert loss.dtype == logits.dtype == jnp.float32
  for tree in (state.params, state.opt_state, state.model_state, new_vars, grads):
    assert {a.dtype for a in jax.tree.leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.leaves(new_vars['batch_stats'])
