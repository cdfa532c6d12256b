"""airbench94 in cvjax (configs/speedrun.py): the net against airbench94's layer list, the
whitening, the alternating flips, the triangular schedule, the optimizer's pieces against
airbench's PyTorch loop written out in numpy, the test-time views, and a short training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import speedrun
from cvjax import models, optim, steps, train
from cvjax.config_checks import check_config
from cvjax.data import memory, transforms
from cvjax.errors import UserError
from cvjax.models import airbench


def airbench94_trainable_parameters():
  """airbench94.py's make_net, layer by layer: Conv(3, 24, 2, bias) frozen but its bias,
  ConvGroups of two 3x3 convs without bias and two BatchNorms whose weight is frozen, a
  Linear(256, 10) without bias."""
  whiten_bias = 24
  convs = 3 * 3 * (24 * 64 + 64 * 64 + 64 * 256 + 256 * 256 + 256 * 256 + 256 * 256)
  bn_biases = 2 * (64 + 256 + 256)
  head = 256 * 10
  return whiten_bias + convs + bn_biases + head  # 1,971,352 (+288 + 1,152 frozen: 1,972,792)


def make(**kw):
  c = speedrun.get_config()
  c.model.update(kw)
  return models.create_model(c.model, num_classes=10, dtype=jnp.float32)


def test_model_shapes_and_parameter_count_match_airbench94():
  # Shapes and dtypes only (jax.eval_shape): nothing computed.
  model = make()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                                                train=False))
  params = variables['params']
  assert sum(x.size for x in jax.tree.leaves(params)) == airbench94_trainable_parameters()
  assert airbench94_trainable_parameters() == 1_971_352
  assert params['group2']['Conv_1']['kernel'].shape == (3, 3, 256, 256)
  assert 'scale' not in params['group1']['BatchNorm_0']  # No BatchNorm scale.
  assert variables['batch_stats']['whiten_kernel'].shape == (2, 2, 3, 24)  # Not a parameter.
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.ones((5, 32, 32, 3)), train=False),
                          variables)
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_dirac_init_passes_the_first_channels_through():
  kernel = airbench.dirac_init(jax.random.key(0), (3, 3, 24, 64))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 24))
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y[..., :24], x, atol=1e-6)
  assert float(jnp.abs(kernel[..., 24:]).max()) <= 1 / np.sqrt(9 * 24)  # PyTorch's bound.


def correlated_images(n=64, seed=0):
  """Smooth, channel-correlated images: patch covariance far from the identity."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 32, 32, 3)).cumsum(1).cumsum(2) / 10
  return jnp.asarray(x + x[..., :1], jnp.float32)


def test_whitening_kernel_whitens_the_patches_it_was_computed_from():
  images = correlated_images()
  p = airbench.patches(images)
  assert p.shape == (64 * 31 * 31, 12)
  cov = np.asarray(p.T @ p / p.shape[0])
  assert np.abs(cov - np.eye(12)).max() > 1  # Far from white before.
  kernel = airbench.whitening_kernel(images, eps=0.0)
  y = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')).reshape(-1, 24)
  white = np.asarray(y[:, :12].T @ y[:, :12] / y.shape[0])
  # float32: with eps=0 the smallest-variance direction is scaled by 1/sqrt(its eigenvalue), so
  # the kernel's own rounding leaves ~8e-4 there (applied in float64) and the convolution's
  # summation order adds to it (1.5e-3 with jax 0.12's XLA:CPU); before: off by more than 1.
  np.testing.assert_allclose(white, np.eye(12), atol=5e-3)
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])  # The negated half.
  # airbench's eps=5e-4 shrinks only directions of variance near eps.
  kernel = airbench.whitening_kernel(images)
  y = jax.lax.conv_general_dilated(images, kernel, (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')).reshape(-1, 24)
  diag = np.diag(np.asarray(y[:, :12].T @ y[:, :12] / y.shape[0]))
  assert np.all(diag <= 1 + 1e-4) and np.all(diag > 0.5)


def test_first_train_step_sets_the_whitening_kernel_once():
  model = make()
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                                         train=False))()
  first, second = correlated_images(8, 0), correlated_images(8, 1)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  _, new = apply(variables, first)
  stats = new['batch_stats']
  assert int(stats['whiten_ready']) == 1
  y = jax.lax.conv_general_dilated(first, stats['whiten_kernel'], (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')).reshape(-1, 24)
  cov = np.asarray(y[:, :12].T @ y[:, :12] / y.shape[0])  # White on the step's images.
  assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-2
  assert np.all(np.diag(cov) <= 1 + 1e-3) and np.all(np.diag(cov) > 0.5)
  _, newer = apply({**variables, 'batch_stats': stats}, second)
  np.testing.assert_array_equal(newer['batch_stats']['whiten_kernel'], stats['whiten_kernel'])


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
  indices = jnp.arange(50_000)
  epochs = [np.asarray(transforms.alternate_flips(indices, jnp.int32(e))) for e in range(4)]
  for a, b in zip(epochs, epochs[1:]):
    np.testing.assert_array_equal(a, ~b)
  assert 0.48 < epochs[0].mean() < 0.52  # Half the images in epoch 0, as airbench's pre-flip.
  # Through the train batch: the same image in epochs 0 and 1 is its own mirror image.
  images = np.asarray(correlated_images(4) * 40 + 128).clip(0, 255).astype(np.uint8)
  data = {'train_images': images, 'train_labels': np.zeros(4, np.int32),
          'mean': np.zeros((1, 1, 1, 3), np.float32), 'std': np.ones((1, 1, 1, 3), np.float32)}
  batch = {'indices': jnp.arange(4)}
  kw = dict(crop_padding=0, flip=True, dtype=jnp.float32, alternate_flip_epoch=10,
            sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  x0, _ = memory.train_batch(data, batch, jax.random.key(0), step=3, **kw)
  x1, _ = memory.train_batch(data, batch, jax.random.key(1), step=13, **kw)
  np.testing.assert_array_equal(x1, x0[:, :, ::-1])
  flipped = np.asarray(epochs[0][:4])
  assert flipped.any() and not flipped.all()
  np.testing.assert_allclose(np.asarray(x0)[flipped], images[flipped][:, :, ::-1] / 255.0,
                             rtol=1e-6)


def test_reflect_translation_stays_inside_the_image():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  out = transforms.augment(x, jax.random.key(0), crop_padding=2, flip=False, pad_mode='reflect')
  for image, crop in zip(np.asarray(x), np.asarray(out)):
    assert set(crop.ravel()) <= set(image.ravel())  # Zero padding would add zeros.
  assert not np.all(np.asarray(out) == np.asarray(x))


def airbench_lr(step, total):
  """airbench94.py's get_lr, as written there."""
  warmup = int(total * 0.23)
  if step < warmup:
    frac = step / warmup
    return 0.2 * (1 - frac) + 1.0 * frac
  frac = (step - warmup) / (total - warmup)
  return 1.0 * (1 - frac) + 0.07 * frac


def test_triangular_schedule_is_airbenchs():
  c = speedrun.get_config()
  schedule = optim.make_schedule(c.schedule, 1.5, 476)
  got = np.array([schedule(s) for s in range(477)])
  want = 1.5 * np.array([airbench_lr(s, 476) for s in range(477)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[0] == pytest.approx(0.3) and got[109] == pytest.approx(1.5)


def airbench_sgd(params, grads_per_step, *, lr, wd, momentum, bias_scaler, bn_bias, every,
                 decay, total):
  """airbench94's torch SGD (Nesterov, per-group lr and weight_decay = wd / lr, on the summed
  loss written here as the mean loss) and LookaheadState, in numpy."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in p.items()}
  ema = {k: v.copy() for k, v in p.items()}
  for step, grads in enumerate(grads_per_step, 1):
    for k in p:
      group_lr = lr * (bias_scaler if k in bn_bias else 1)
      d_p = grads[k] + (wd * lr / group_lr) * p[k]
      buf[k] = momentum * buf[k] + d_p
      p[k] = p[k] - group_lr * (d_p + momentum * buf[k])
    if step % every == 0:
      alpha = decay * (step / total) ** 3
      for k in p:
        ema[k] = alpha * ema[k] + (1 - alpha) * p[k]
        p[k] = ema[k].copy()
    if step >= total:
      p = {k: v.copy() for k, v in ema.items()}
  return p


def test_optimizer_is_airbenchs_sgd_with_bias_scale_and_lookahead():
  c = speedrun.get_config()
  c.optimizer.whiten_bias_frozen_at = 1.0
  total = 12
  params = {'BatchNorm_0': {'bias': np.full(3, 0.5)}, 'Conv_0': {'kernel': np.ones((2, 3))}}
  rng = np.random.default_rng(0)
  grads = [{'BatchNorm_0': {'bias': rng.normal(size=3)}, 'Conv_0': {'kernel': rng.normal(
      size=(2, 3))}} for _ in range(total)]
  tx = optim.make_optimizer(c.optimizer, lambda step: c.optimizer.learning_rate, total)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  o = c.optimizer
  flat = lambda t: {'bn': t['BatchNorm_0']['bias'], 'conv': t['Conv_0']['kernel']}
  want = airbench_sgd(flat(params), [flat(g) for g in grads], lr=o.learning_rate,
                      wd=o.weight_decay, momentum=0.85, bias_scaler=64, bn_bias={'bn'},
                      every=5, decay=0.95 ** 5, total=total)
  np.testing.assert_allclose(flat(p)['bn'], want['bn'], rtol=1e-5)
  np.testing.assert_allclose(flat(p)['conv'], want['conv'], rtol=1e-5)
  assert o.learning_rate == pytest.approx(1.5)


def test_whitening_bias_is_frozen_after_its_share_of_the_run():
  tx = optim.freeze_after(3, 'whiten_bias')
  u = {'whiten_bias': jnp.ones(2), 'other': jnp.ones(2)}
  state = tx.init(u)
  for step in range(5):
    out, state = tx.update(u, state)
    assert float(out['whiten_bias'][0]) == (1.0 if step < 3 else 0.0)
    assert float(out['other'][0]) == 1.0


def test_tta_is_airbenchs_six_views():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  views = transforms.translate_views(x, 1)
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  np.testing.assert_array_equal(views[0], padded[:, :6, :6])
  np.testing.assert_array_equal(views[1], padded[:, 2:8, 2:8])
  w = jax.random.normal(jax.random.key(1), (6 * 6 * 3, 4))
  net = lambda v: v.reshape(v.shape[0], -1) @ w
  mirror = lambda v: 0.5 * net(v) + 0.5 * net(v[:, :, ::-1])
  want = 0.5 * mirror(x) + 0.5 * (mirror(views[0]) + mirror(views[1])) / 2  # airbench's infer.
  np.testing.assert_allclose(steps.tta_logits(net, x, 1), want, rtol=1e-5, atol=1e-5)


def test_configs_build_and_reject_bad_fields():
  for arg in ['', 'quick', *speedrun.ABLATIONS, 'quick,no_lookahead']:
    c = speedrun.get_config(arg)
    check_config(c, 1)
  assert speedrun.get_config('no_lookahead').optimizer.lookahead_every == 0
  with pytest.raises(ValueError, match='unknown'):
    speedrun.get_config('no_such_thing')
  c = speedrun.get_config()
  c.eval.flip = False
  with pytest.raises(UserError, match='eval.flip=True'):
    check_config(c, 1)
  c = speedrun.get_config()
  c.input.crop_pad_mode = 'wrap'
  with pytest.raises(UserError, match='crop_pad_mode'):
    check_config(c, 1)
  c = speedrun.get_config()
  c.optimizer.name = 'adamw'
  with pytest.raises(UserError, match='optimizer.name=sgd'):
    check_config(c, 1)


def test_streamed_data_refuses_the_in_memory_augmentations():
  from cvjax import experiment  # pylint: disable=g-import-not-at-top
  c = speedrun.get_config()
  c.dataset.pipeline = 'streaming'
  with pytest.raises(UserError, match='input.alternate_flip'):
    experiment.build(c)


@pytest.mark.slow
def test_short_training_on_the_embedded_cifar_subset_learns(tmp_path):
  """The recipe end to end (narrow widths, 24 steps of batch 128 on cifar10_6k): the training
  loss falls and the final evaluation runs with the six-view TTA."""
  c = speedrun.get_config('quick')
  c.model.widths = (16, 32, 32)
  c.train.batch_size = 128
  c.optimizer.learning_rate = 1.5 * 128 / 1024
  c.train.num_steps = 24
  c.train.log_every_steps = 4
  c.train.eval_every_steps = 24
  c.train.eval_batch_size = 500
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  # Label smoothing 0.2 and the triangle's slow start: ~2.30 -> ~2.24 in 24 steps here.
  assert losses[-1] < losses[0] - 0.04 and min(losses[-2:]) < min(losses[:2]) - 0.04, losses
  assert any('test/error' in r for r in rows)


def test_ablation_sweep_turns_each_technique_off_over_seeds():
  import os  # pylint: disable=g-import-not-at-top
  from cvjax import sweep  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  trials = dict(sweep.load_trials(os.path.join(root, 'experiments/speedrun_ablation.py:quick')))
  assert list(trials) == ['full', *speedrun.ABLATIONS]
  for name, overrides in trials.items():
    assert overrides['population.seeds'] == 3 and overrides['dataset.name'] == 'cifar10_6k'
    c = speedrun.apply(speedrun.get_config(), overrides)
    check_config(c, 1)
    if name != 'full':
      assert any(c[k.split('.')[0]][k.split('.')[1]] != speedrun.get_config()[k.split('.')[0]][
          k.split('.')[1]] for k in speedrun.ABLATIONS[name]), name
  full = dict(sweep.load_trials(os.path.join(root, 'experiments/speedrun_ablation.py:seeds=2')))
  assert full['no_tta'] == {'population.seeds': 2, 'eval.flip': False, 'eval.translate': 0}
