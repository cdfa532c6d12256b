"""Training and evaluation: the train state, the jitted steps, and one training loop."""

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from cvjax import checkpointing
from cvjax import input_pipeline
from cvjax import models
from cvjax import optim
from cvjax.errors import UserError
from cvjax.metric_writer import MetricWriter


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # The other variable collections: BatchNorm statistics, constants.
  opt_state: Any


def make_mesh(devices=None):
  """A 1-D mesh over all devices: the batch is split along 'data', the state replicated."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices, ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def classification_metrics(logits, labels, mask=None):
  """Sums over the batch (not means), so batches and devices add up exactly."""
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {
      'loss': jnp.sum(loss * mask),
      'errors': jnp.sum((jnp.argmax(logits, -1) != labels) * mask),
      'top5_errors': jnp.sum(jnp.all(top5 != labels[:, None], axis=-1) * mask),
      'count': jnp.sum(mask),
  }


def train_step(state, data, indices, rng, *, model, tx, input_cfg, batch_sharding, dtype):
  """One SGD step on the examples `indices` of the device-resident training set."""
  images = jax.lax.with_sharding_constraint(data['train_images'][indices], batch_sharding)
  labels = data['train_labels'][indices]
  # fold_in the step: a resumed run draws the same numbers.
  augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  x = input_pipeline.normalize(images, data['mean'], data['std'])
  x = input_pipeline.augment(x, augment_rng, crop_padding=input_cfg.crop_padding,
                             flip=input_cfg.flip).astype(dtype)

  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, **state.model_state}, x, train=True,
                                   rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    metrics = classification_metrics(logits, labels)
    return metrics['loss'] / labels.shape[0], (metrics, new_vars)

  grads, (metrics, new_vars) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        model_state={**state.model_state, **new_vars}, opt_state=opt_state)
  return state, metrics


def eval_step(state, test, index, *, model, batch_size, batch_sharding, dtype):
  """Metric sums over the `index`-th batch of the padded, device-resident test set."""
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, index * batch_size, batch_size)
  images = jax.lax.with_sharding_constraint(take(test['images']), batch_sharding)
  x = input_pipeline.normalize(images, test['mean'], test['std']).astype(dtype)
  logits = model.apply({'params': state.params, **state.model_state}, x, train=False)
  return classification_metrics(logits, take(test['labels']), take(test['mask']))


def evaluate(p_eval_step, state, test_data, num_batches, num_classes):
  """Test metrics over every example exactly once (the padding is masked out)."""
  sums = [p_eval_step(state, test_data, i) for i in range(num_batches)]
  sums = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))
  out = {'test/loss': sums['loss'] / sums['count'], 'test/error': sums['errors'] / sums['count'],
         'test/count': sums['count']}
  if num_classes > 5:
    out['test/top5_error'] = sums['top5_errors'] / sums['count']
  return out


def steps_for(config, num_train):
  """(steps per epoch, total steps): `train.num_steps` wins over `train.num_epochs`."""
  batch = config.train.batch_size
  if batch > num_train:
    raise UserError(f'train.batch_size={batch} exceeds the {num_train} training examples.')
  per_epoch = num_train // batch  # The last partial batch of an epoch is dropped.
  total = config.train.num_steps or int(math.ceil(config.train.num_epochs * per_epoch))
  if total <= 0:
    raise UserError('set train.num_steps or train.num_epochs to a positive number.')
  return per_epoch, total


def check_config(config, num_devices):
  for key in ('batch_size', 'eval_batch_size'):
    b = config.train[key]
    if b <= 0 or b % num_devices:
      raise UserError(f'train.{key}={b} must be a positive multiple of the {num_devices} '
                      'devices the batch is split over.')
  if config.train.compute_dtype not in ('float32', 'bfloat16'):
    raise UserError(f'train.compute_dtype={config.train.compute_dtype!r}; expected float32 or '
                    'bfloat16.')


def _fmt_time(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def train_and_evaluate(config, workdir, *, devices=None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns
  (final train state, final test metrics)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} exists and is not a directory.')
  mesh = make_mesh(devices)
  check_config(config, mesh.size)

  # --- Input: the whole dataset in memory. ---
  data = input_pipeline.load(config.dataset)
  train_images = input_pipeline.pad_to(data.train_images, config.input.image_size)
  test_images = input_pipeline.pad_to(data.test_images, config.input.image_size)
  mean, std = input_pipeline.normalization_stats(train_images, config.input.normalization)
  input_shape = train_images.shape[1:]
  steps_per_epoch, total_steps = steps_for(config, len(train_images))

  # --- Model, optimizer. ---
  dtype = jnp.dtype(config.train.compute_dtype)
  model = models.create_model(config.model, num_classes=data.num_classes, dtype=dtype)
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate, total_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)

  # --- Shardings: state and dataset replicated, batches split along 'data'. ---
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  device_data = jax.device_put({'train_images': train_images,
                                'train_labels': data.train_labels, 'mean': mean, 'std': std},
                               replicated)

  # --- Train state: shapes first, then built directly in place. ---
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *input_shape), dtype), train=False)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init, init_rng)
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpointing.manager(workdir, config.train.keep_checkpoints)
  identity = {'model': config.model.to_dict(), 'num_classes': data.num_classes,
              'input_shape': list(input_shape)}
  state = checkpointing.restore_latest(
      mngr, checkpointing.abstract_with_sharding(abstract_state, replicated), identity)
  if state is None:
    state = jax.jit(init, out_shardings=replicated)(init_rng)
  start_step = int(state.step)
  if start_step:
    logging.info('Resuming from the checkpoint at step %d.', start_step)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  writer = MetricWriter(workdir, resume_step=start_step)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info('%s: %d parameters, %d train / %d test examples %s, %d classes, %d steps '
               '(%d per epoch), %d device(s).', config.model.name, num_params,
               len(train_images), len(test_images), input_shape, data.num_classes,
               total_steps, steps_per_epoch, mesh.size)

  # --- The jitted steps. ---
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx, input_cfg=config.input,
                        batch_sharding=batch_sharding, dtype=dtype),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  eval_batch = config.train.eval_batch_size
  num_eval_batches = -(-len(test_images) // eval_batch)
  padded = num_eval_batches * eval_batch - len(test_images)  # Padded, then masked out.
  test_data = jax.device_put(
      {'images': np.pad(test_images, ((0, padded), (0, 0), (0, 0), (0, 0))),
       'labels': np.pad(data.test_labels, (0, padded)),
       'mask': np.pad(np.ones(len(test_images), np.bool_), (0, padded)),
       'mean': mean, 'std': std}, replicated)
  p_eval_step = jax.jit(
      functools.partial(eval_step, model=model, batch_size=eval_batch,
                        batch_sharding=batch_sharding, dtype=dtype),
      out_shardings=replicated)


  # --- The loop. ---
  log_every = config.train.log_every_steps
  eval_every = config.train.eval_every_steps or steps_per_epoch
  ckpt_every = config.train.checkpoint_every_steps
  acc, test_metrics, perm, epoch = None, {}, None, -1
  t_last, step_last, excluded = None, start_step, 0.0
  for step in range(start_step, total_steps):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      perm = input_pipeline.epoch_permutation(config.seed, epoch, len(train_images))
    i = step % steps_per_epoch
    indices = jax.device_put(perm[i * config.train.batch_size:(i + 1) * config.train.batch_size],
                             batch_sharding)
    state, metrics = p_train_step(state, device_data, indices, train_rng)
    acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
    done = step + 1

    if t_last is None:  # Compilation and the first step: kept out of images/s.
      jax.block_until_ready(state)
      t_last, step_last = time.perf_counter(), done
      logging.info('First step (with compilation) done.')

    if done % log_every == 0 or done == total_steps:
      sums = jax.device_get(acc)  # The only host pull of train metrics: once per log.
      acc = None
      if not np.isfinite(sums['loss']):
        mngr.wait_until_finished()
        raise UserError(f'the training loss became {sums["loss"]} between steps '
                        f'{done - log_every} and {done}; try a lower optimizer.learning_rate '
                        '(checkpoints written so far are intact).')
      now = time.perf_counter()
      elapsed = now - t_last - excluded
      ips = (done - step_last) * config.train.batch_size / elapsed if done > step_last else 0.0
      scalars = {'train/loss': sums['loss'] / sums['count'],
                 'train/error': sums['errors'] / sums['count'],
                 'train/learning_rate': float(schedule(step)),
                 'train/images_per_second': ips}
      writer.write_scalars(done, scalars)
      eta = (total_steps - done) * config.train.batch_size / ips if ips else 0
      logging.info('step %d/%d  loss %.4f  error %.2f%%  lr %.4g  %.0f img/s  ETA %s', done,
                   total_steps, scalars['train/loss'], 100 * scalars['train/error'],
                   scalars['train/learning_rate'], ips, _fmt_time(eta))
      t_last, step_last, excluded = now, done, 0.0

    if done % eval_every == 0 or done == total_steps:
      t0 = time.perf_counter()
      test_metrics = evaluate(p_eval_step, state, test_data, num_eval_batches, data.num_classes)
      writer.write_scalars(done, test_metrics)
      logging.info('step %d/%d  test loss %.4f  error %.2f%%%s', done, total_steps,
                   test_metrics['test/loss'], 100 * test_metrics['test/error'],
                   f'  top-5 error {100 * test_metrics["test/top5_error"]:.2f}%'
                   if 'test/top5_error' in test_metrics else '')
      excluded += time.perf_counter() - t0

    if (ckpt_every and done % ckpt_every == 0) or done == total_steps or \
        mngr.reached_preemption(done):
      t0 = time.perf_counter()
      checkpointing.save(mngr, done, state, identity)
      excluded += time.perf_counter() - t0
      if mngr.reached_preemption(done):
        mngr.wait_until_finished()
        logging.warning('Preempted at step %d; re-run the same command to resume.', done)
        break

  mngr.wait_until_finished()
  writer.close()
  if start_step >= total_steps:
    logging.info('Nothing to do: the checkpoint is at step %d of %d.', start_step, total_steps)
  return state, {k: float(v) for k, v in test_metrics.items()}
