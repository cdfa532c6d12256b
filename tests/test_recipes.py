"""The recipes beyond the papers (docs/recipes.md): each changes what it should, and off (the
default) leaves the papers' train step exactly as it was."""

import dataclasses
import functools
import json
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import bars, tiny_config, write_idx
from cvjax import checkpointing, ema, experiment, losses, optim, steps, train
from cvjax.data import memory, transforms
from cvjax.errors import UserError


def first_batch(config):
  s = experiment.build(config)
  state = steps.init_state(s.init, jax.random.key(0), None)
  return s, state, jax.device_put(s.input.train_data), next(s.input.train_batches(0))


def step_fn(s, **kw):
  """The one-program train step of setup `s` (split_backward aside), unjitted pieces jitted."""
  opts = steps.step_options(s.config, s.mesh, s.input.make_train_batch, s.model, s.tx)
  return jax.jit(functools.partial(steps.train_step, opts=dataclasses.replace(opts, **kw)))


@pytest.mark.slow
def test_the_default_step_is_the_papers_step_bit_for_bit(idx_dir):
  """Every recipe off (the defaults): the step equals the step as it was written before them:
  crops and flips, integer-label cross-entropy, SGD + L2 + momentum."""
  s, state, data, batch = first_batch(tiny_config(idx_dir))
  new, metrics = step_fn(s)(state, data, batch, jax.random.key(1))

  def reference(state, data, batch, rng):
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    x = transforms.normalize(data['train_images'][batch['indices']], data['mean'], data['std'])
    x = transforms.augment(x, augment_rng, crop_padding=2, flip=True)
    labels = data['train_labels'][batch['indices']]

    def loss_fn(params):
      logits, new_vars = s.model.apply({'params': params, **state.model_state}, x, train=True,
                                       rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
      loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
      return loss / labels.shape[0], (loss, new_vars)
    grads, (loss, new_vars) = jax.grad(loss_fn, has_aux=True)(state.params)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(s.schedule, momentum=0.9))
    updates, _ = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), {**state.model_state, **new_vars}, loss
  params, model_state, loss = jax.jit(reference)(state, data, batch, jax.random.key(1))
  assert new.ema is None
  np.testing.assert_array_equal(metrics['loss'], loss)
  jax.tree.map(np.testing.assert_array_equal, (new.params, new.model_state),
               (params, model_state))


@pytest.mark.slow
def test_label_smoothing_is_optax_formula_and_zero_is_the_plain_loss():
  logits = jax.random.normal(jax.random.key(0), (16, 10)) * 3
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  one_hot = jax.nn.one_hot(labels, 10)
  for a in (0.1, 0.2):
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels, a),
        optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, a)), rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, 0.0),
                             optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-6)
  # Mixed targets: the cross-entropy with the mixed (and smoothed) one-hot distributions.
  other = jnp.roll(labels, 1)
  weight = jnp.full((16,), 0.3)
  target = optax.smooth_labels(0.3 * one_hot + 0.7 * jax.nn.one_hot(other, 10), 0.1)
  np.testing.assert_allclose(
      losses.train_loss_sum(logits, {'labels': labels, 'mixed_labels': other, 'weight': weight},
                            0.1),
      jnp.sum(optax.softmax_cross_entropy(logits, target)), rtol=1e-6)


@pytest.mark.slow
def test_the_step_trains_on_the_smoothed_loss(idx_dir):
  config = tiny_config(idx_dir, **{'train.label_smoothing': 0.1})
  s, state, data, batch = first_batch(config)
  opts = steps.step_options(config, s.mesh, s.input.make_train_batch, s.model, s.tx)
  x, targets, _ = steps.train_inputs(state, data, batch, jax.random.key(1), opts)
  logits, _ = s.model.apply({'params': state.params, **state.model_state}, x, train=True,
                            mutable=['batch_stats'])
  want = jnp.mean(optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(targets['labels'], 10), 0.1)))
  def loss(opts):  # The mean loss the step takes the gradient of.
    _, metrics, _ = steps.train_forward(state, data, batch, jax.random.key(1), opts)
    return metrics['loss'] / x.shape[0]
  np.testing.assert_allclose(loss(opts), want, rtol=1e-5)
  plain = loss(dataclasses.replace(opts, label_smoothing=0.0))
  assert abs(float(plain) - float(want)) > 1e-3  # It changed the loss.


def images(seed=0, b=8, size=12):
  return jax.random.uniform(jax.random.key(seed), (b, size, size, 3), minval=0.1, maxval=1.0)


@pytest.mark.slow
def test_mixup_mixes_with_the_rolled_batch_and_prob_zero_mixes_nothing():
  x, labels = images(), jnp.arange(8)
  mixed, other, weight = transforms.mix(x, labels, jax.random.key(3), mixup_alpha=0.4)
  lam = float(weight[0])
  assert 0 < lam < 1 and np.all(np.asarray(weight) == lam)
  np.testing.assert_array_equal(other, jnp.roll(labels, 1))
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * jnp.roll(x, 1, axis=0), rtol=1e-6)
  again = transforms.mix(x, labels, jax.random.key(3), mixup_alpha=0.4)
  np.testing.assert_array_equal(again[0], mixed)  # A function of the rng.
  for kw in ({'mixup_alpha': 0.4}, {'cutmix_alpha': 1.0}, {'mixup_alpha': 1, 'cutmix_alpha': 1}):
    same, _, weight = transforms.mix(x, labels, jax.random.key(3), prob=0.0, **kw)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(weight, 1.0)


def test_cutmix_pastes_one_box_whose_area_sets_the_weight():
  x, labels = images(), jnp.arange(8)
  cutmix = jax.jit(functools.partial(transforms.mix, cutmix_alpha=1.0))  # One program.
  rolled = np.roll(x, 1, axis=0)
  pasted_fractions = []
  for seed in range(6):
    mixed, _, weight = jax.device_get(cutmix(x, labels, jax.random.key(seed)))
    from_rolled = np.all(mixed == rolled, axis=-1)
    assert np.all((mixed == rolled) | (mixed == np.asarray(x)))
    box = from_rolled[0]
    assert np.all(from_rolled == box)  # The same box in every image.
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert box.sum() == len(rows) * len(cols)  # A rectangle.
    np.testing.assert_allclose(1 - float(weight[0]), box.mean(), rtol=1e-6)
    pasted_fractions.append(box.mean())
  assert max(pasted_fractions) > 0


def test_both_alphas_switch_between_mixup_and_cutmix():
  x, labels = images(), jnp.arange(8)
  kinds = []
  for seed in range(40):
    mixed, _, _ = transforms.mix(x, labels, jax.random.key(seed), mixup_alpha=0.2,
                                    cutmix_alpha=1.0, cutmix_prob=0.5)
    pixel_from_either = jnp.all((mixed == x) | (mixed == jnp.roll(x, 1, axis=0)))
    kinds.append(bool(pixel_from_either))
  assert 8 <= sum(kinds) <= 32, sum(kinds)  # About half CutMix (p = 0.5, 40 draws).


@pytest.mark.slow
def test_random_erasing_sets_one_box_per_image_to_zero():
  x = images(b=64, size=32)
  np.testing.assert_array_equal(transforms.random_erase(x, jax.random.key(0), 0.0), x)
  erased = np.asarray(transforms.random_erase(x, jax.random.key(0), 1.0))
  zero = np.all(erased == 0, axis=-1)
  np.testing.assert_array_equal(erased[~zero], np.asarray(x)[~zero])
  for box in zero:
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    assert box.sum() == len(rows) * len(cols)
    # torchvision's scale (0.02, 0.33) of the area, up to rounding of the sides; a box that
    # fits in 10 attempts is nearly certain at these scales.
    assert 0.01 < box.mean() < 0.36, box.mean()
  some = np.all(np.asarray(transforms.random_erase(x, jax.random.key(0), 0.5)) == 0, -1)
  assert 16 <= some.any(axis=(1, 2)).sum() <= 48


@pytest.mark.slow
def test_ema_decay_zero_is_the_raw_weights_and_the_warmup_follows_tf(idx_dir):
  config = tiny_config(idx_dir, **{'train.ema_decay': 0.999})
  s, state, data, batch = first_batch(config)
  assert state.ema is not None
  step = step_fn(s, ema_decay=0.0)
  for i in range(2):
    state, _ = step(state, data, batch, jax.random.key(i))
  jax.tree.map(np.testing.assert_array_equal, state.ema,
               {'params': state.params, 'model_state': state.model_state})
  np.testing.assert_allclose(ema.decay_at(0, 0.999), 0.1)
  np.testing.assert_allclose(ema.decay_at(90, 0.999), 91 / 100)
  np.testing.assert_allclose(ema.decay_at(10 ** 6, 0.999), 0.999)
  np.testing.assert_allclose(ema.decay_at(5, 0.5, warmup=False), 0.5)
  avg = ema.update({'params': {'w': jnp.ones(3)}, 'model_state': {}}, {'w': jnp.zeros(3)}, {},
                   step=100, decay=0.75)
  np.testing.assert_allclose(avg['params']['w'], 0.75)


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_resumed_exactly(idx_dir, tmp_path):
  config = tiny_config(idx_dir, **{'train.ema_decay': 0.9})  # 12 steps, checkpoints every 4.
  full, metrics = train.train_and_evaluate(config, str(tmp_path / 'full'))
  assert {'test/ema_error', 'test/ema_loss', 'test/ema_top5_error'} <= set(metrics)
  results = json.load(open(tmp_path / 'full' / 'results.json'))
  assert results['test/ema_error'] == pytest.approx(metrics['test/ema_error'])
  from cvjax import evaluate  # pylint: disable=g-import-not-at-top
  evaluated, _ = evaluate.evaluate_checkpoint(config, str(tmp_path / 'full'))
  assert evaluated['test/ema_loss'] == pytest.approx(metrics['test/ema_loss'], rel=1e-5)
  # The average is not the raw weights (it lags them).
  assert not np.allclose(full.ema['params']['head']['kernel'], full.params['head']['kernel'])
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  for step in ('8', '12'):
    shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / step)
  resumed, again = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 12
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (full.params, full.ema), (resumed.params, resumed.ema))
  assert again['test/ema_error'] == pytest.approx(metrics['test/ema_error'])


def test_checkpoints_without_ema_keep_their_layout_and_older_ones_restore(idx_dir, tmp_path):
  @flax.struct.dataclass
  class OlderTrainState:  # The train state before it had an `ema` field.
    step: jax.Array
    params: dict
    model_state: dict
    opt_state: tuple
  s = experiment.build(tiny_config(idx_dir))
  state = steps.init_state(s.init, jax.random.key(0), None)
  assert 'ema' not in checkpointing.saved_fields(state)
  older = OlderTrainState(state.step + 3, state.params, state.model_state, state.opt_state)
  mngr = checkpointing.manager(tmp_path, 2)
  mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(older),
                                       identity=ocp.args.JsonSave(s.fingerprint)))
  mngr.wait_until_finished()
  restored = checkpointing.restore_latest(mngr, s.abstract_state, s.fingerprint)
  assert isinstance(restored, steps.TrainState) and restored.ema is None
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_a_checkpoint_cannot_change_ema_on_resume(idx_dir, tmp_path):
  s = experiment.build(tiny_config(idx_dir))
  mngr = checkpointing.manager(tmp_path, 2)
  checkpointing.save(mngr, 1, steps.init_state(s.init, jax.random.key(0), None), s.fingerprint)
  mngr.wait_until_finished()
  with_ema = experiment.build(tiny_config(idx_dir, **{'train.ema_decay': 0.99}))
  with pytest.raises(UserError, match='train.ema_decay to or from 0'):
    checkpointing.restore_latest(mngr, with_ema.abstract_state, with_ema.fingerprint)


@pytest.fixture(scope='module')
def idx_256(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('idx256'))
  write_idx(folder, *bars(256, seed=0), 'train')
  write_idx(folder, *bars(40, seed=1), 't10k')
  return folder


@pytest.mark.slow
def test_two_micro_batches_of_64_are_one_step_of_128_without_batchnorm(idx_256):
  config = tiny_config(idx_256, **{'train.batch_size': 128, 'model.batch_norm': False,
                                   'optimizer.learning_rate': 0.05})
  s, state, data, batch = first_batch(config)
  one, m1 = step_fn(s)(state, data, batch, jax.random.key(1))
  two, m2 = step_fn(s, accumulate_steps=2)(state, data, batch, jax.random.key(1))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # The step did something.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               one.params, two.params)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  assert m1['count'] == m2['count'] == 128 and m1['errors'] == m2['errors']


@pytest.mark.slow
def test_accumulation_with_batchnorm_updates_the_running_averages_per_micro_batch(idx_256):
  config = tiny_config(idx_256, **{'train.batch_size': 128})
  s, state, data, batch = first_batch(config)
  two, metrics = step_fn(s, accumulate_steps=2)(state, data, batch, jax.random.key(1))
  assert metrics['count'] == 128 and np.isfinite(metrics['loss'])
  one, _ = step_fn(s)(state, data, batch, jax.random.key(1))
  first = lambda st: jax.tree.leaves(st.model_state['batch_stats'])[0]
  assert not np.allclose(first(two), first(one))


@pytest.mark.slow
def test_flip_averages_the_logits_of_each_image_and_its_mirror(idx_dir):
  s, state, _, _ = first_batch(tiny_config(idx_dir))
  test = jax.device_put(s.input.test_data)
  kw = dict(model=s.model, make_eval_batch=functools.partial(memory.eval_batch, batch_size=16),
            dtype=jnp.float32, batch_sharding=steps.step_options(
                s.config, s.mesh, s.input.make_train_batch, s.model, s.tx).batch_sharding)
  batch = {'index': np.int32(0)}
  flipped, _ = jax.jit(functools.partial(steps.eval_step, flip=True, **kw))(state, test, batch)
  x = transforms.normalize(test['images'][:16], test['mean'], test['std'])
  apply = lambda x: s.model.apply({'params': state.params, **state.model_state}, x)
  want = steps.classification_metrics((apply(x) + apply(x[:, :, ::-1])) / 2, test['labels'][:16],
                                      test['mask'][:16])
  np.testing.assert_allclose(flipped['loss'], want['loss'], rtol=1e-5)
  plain, _ = jax.jit(functools.partial(steps.eval_step, **kw))(state, test, batch)
  assert abs(float(plain['loss']) - float(flipped['loss'])) > 1e-4


def test_decay_mask_leaves_out_batchnorm_and_biases(idx_dir):
  s = experiment.build(tiny_config(idx_dir))
  mask = optim.decay_mask(s.abstract_state.params)
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    name = path[-1].key
    assert decayed == (name == 'kernel'), (path, decayed)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars', 'lamb'])
@pytest.mark.slow
def test_each_optimizer_steps_and_the_mask_spares_batchnorm_and_biases(idx_dir, name):
  config = tiny_config(idx_dir, **{'optimizer.name': name, 'optimizer.weight_decay': 0.1,
                                   'optimizer.decay_bn_and_bias': False,
                                   'schedule.name': 'constant'})
  s = experiment.build(config)
  params = jax.tree.map(lambda p: p + 0.5, steps.init_state(s.init, jax.random.key(0),
                                                            None).params)
  zero = jax.tree.map(jnp.zeros_like, params)  # Only weight decay moves the parameters.
  updates, _ = s.tx.update(zero, s.tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    moved = float(jnp.max(jnp.abs(u)))
    assert (moved > 0) == (path[-1].key == 'kernel'), (name, path, moved)


def test_polynomial_schedule_warms_up_then_decays_with_its_power():
  from configs import common  # pylint: disable=g-import-not-at-top
  cfg = common.base_config().schedule
  cfg.name, cfg.warmup_steps, cfg.power, cfg.end_value = 'polynomial', 10, 2.0, 0.01
  schedule = optim.make_schedule(cfg, 1.0, 110)
  np.testing.assert_allclose([schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.5, 1.0, 0.99 * 0.25 + 0.01, 0.01], rtol=1e-6)


@pytest.mark.parametrize('field,value,message', [
    ('train.label_smoothing', 1.0, r'train.label_smoothing=1.0; expected a number in \[0, 1\)'),
    ('train.ema_decay', 1.5, 'train.ema_decay=1.5; expected a per-step decay'),
    ('input.mixup_alpha', -0.2, 'input.mixup_alpha=-0.2'),
    ('input.mix_prob', 2.0, 'input.mix_prob=2.0; expected a probability'),
    ('input.random_erasing', 1.5, 'input.random_erasing=1.5'),
    ('train.accumulate_steps', 0, r'train.accumulate_steps=0; expected an integer >= 1'),
    ('train.accumulate_steps', 3, 'does not split into train.accumulate_steps=3 micro-batches'),
    ('optimizer.name', 'adam', "unknown optimizer.name='adam'; expected sgd, adamw, lars, lamb"),
    ('schedule.name', 'linear', "unknown schedule.name='linear'"),
    ('schedule.end_value', 5.0, 'schedule.end_value=5.0'),
    ('eval.crops', 10, 'eval.flip=True with eval.crops=10'),
])
def test_bad_recipe_values_are_one_clear_error(idx_dir, field, value, message):
  overrides = {field: value}
  if field == 'eval.crops':
    overrides['eval.flip'] = True
  with pytest.raises(UserError, match=message):
    experiment.build(tiny_config(idx_dir, **overrides))


def textured(w=48, h=40, seed=0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  # Low contrast, so autocontrast and equalize have something to stretch.
  return Image.fromarray(rng.integers(60, 180, (h, w, 3)).astype(np.uint8))


def test_trivial_augment_wide_draws_every_operation_and_each_changes_the_image():
  from cvjax.data import auto_augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  draws = [auto_augment.sample(rng) for _ in range(3000)]
  assert {op for op, _ in draws} == set(auto_augment.OPS)
  by_op = lambda name: [m for op, m in draws if op == name]
  assert min(by_op('rotate')) < -120 and max(by_op('rotate')) > 120  # Signed, up to 135.
  assert set(by_op('posterize')) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
  assert min(by_op('solarize')) == 0 and max(by_op('solarize')) == 255
  img = textured()
  for op in auto_augment.OPS:
    strongest = {'posterize': 2, 'solarize': 128}.get(op, auto_augment.MAX_MAGNITUDE[op] or 0)
    out = auto_augment.apply(img, op, strongest)
    assert out.size == img.size and out.mode == img.mode
    assert np.array_equal(np.asarray(out), np.asarray(img)) == (op == 'identity'), op


def test_trivial_augment_in_the_streaming_transform_is_a_function_of_the_rng():
  import io  # pylint: disable=g-import-not-at-top
  from cvjax.data import streaming  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  textured(80, 60).save(buf, format='PNG')
  record = {'image': buf.getvalue(), 'label': 3}
  kw = dict(size=32, area=(0.5, 1.0), aspect=(3 / 4, 4 / 3), flip=True)
  plain = [streaming.train_transform(record, np.random.default_rng(i), **kw) for i in range(8)]
  aug = [streaming.train_transform(record, np.random.default_rng(i), **kw,
                                   auto_augment='trivial_augment_wide') for i in range(8)]
  again = streaming.train_transform(record, np.random.default_rng(5), **kw,
                                    auto_augment='trivial_augment_wide')
  np.testing.assert_array_equal(again['images'], aug[5]['images'])
  assert all(a['images'].shape == (32, 32, 3) and a['labels'] == 3 for a in aug)
  assert sum(not np.array_equal(a['images'], p['images']) for a, p in zip(aug, plain)) >= 4


def test_auto_augment_is_refused_for_in_memory_data_and_unknown_names(idx_dir):
  with pytest.raises(UserError, match='runs in the streaming pipeline'):
    experiment.build(tiny_config(idx_dir, **{'input.auto_augment': 'trivial_augment_wide'}))
  with pytest.raises(UserError, match="input.auto_augment='randaugment'; expected"):
    experiment.build(tiny_config(idx_dir, **{'input.auto_augment': 'randaugment'}))


@pytest.mark.slow
def test_benchmark_times_the_step_with_each_recipe():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, '-m', 'cvjax.tools.benchmark', '--model=lenet5', '--batch_size=16',
       '--steps=2', '--warmup=0', '--variants=split', '--conv=xla', '--recipe=none,all',
       '--matmul_size=512'],  # A rough MFU roof: no assertion needs it precise.
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out.stdout.strip().splitlines()[-1])['results']
  assert [r['recipe'] for r in rows] == ['none', 'all']
  assert all(r['train_images_per_s'] > 0 and r['gflops_per_step'] > 0 for r in rows)
  assert rows[1]['gflops_per_step'] > rows[0]['gflops_per_step'], rows  # The recipes ran.


@pytest.mark.slow
def test_a_population_member_with_the_recipes_equals_its_run_alone(idx_dir, tmp_path):
  recipes = {'train.ema_decay': 0.9, 'train.label_smoothing': 0.1, 'input.mixup_alpha': 0.2,
             'input.random_erasing': 0.5, 'train.num_steps': 6, 'train.native_conv': False}
  pop = tiny_config(idx_dir, **recipes)
  pop.population.seeds = 2
  states, metrics = train.train_and_evaluate(pop, str(tmp_path / 'population'))
  alone_config = tiny_config(idx_dir, **recipes)
  alone_config.seed = 1
  alone, alone_metrics = train.train_and_evaluate(alone_config, str(tmp_path / 'alone'))
  member = jax.tree.map(lambda x: x[1], states['group0'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               (member.params, member.ema), (alone.params, alone.ema))
  [name] = [n for n in metrics if n.endswith('1')]
  assert metrics[name]['test/ema_loss'] == pytest.approx(alone_metrics['test/ema_loss'], rel=1e-4)

