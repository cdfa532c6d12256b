"""Training and evaluation: the train state, the jitted steps, and one training loop."""

import dataclasses
import functools
import itertools
import json
import math
import time
from typing import Any

from absl import logging
from etils import epath
import flax
import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from cvjax import checkpointing
from cvjax import data as data_lib
from cvjax import ema as ema_lib
from cvjax import error_analysis
from cvjax import losses
from cvjax import models
from cvjax import optim
from cvjax import population
from cvjax import preemption
from cvjax import run_lock
from cvjax import sharding as sharding_lib
from cvjax.data import batch_augment
from cvjax.data import memory
from cvjax.errors import UserError
from cvjax.ops import convolution
from cvjax import metric_writer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # The other variable collections: BatchNorm statistics, constants.
  opt_state: Any
  # With train.ema_decay: {'params', 'model_state'}, their moving average (cvjax/ema.py).
  # None is saved as nothing, so checkpoints without it keep their layout.
  ema: Any = None


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


def _batch(state, data, batch, rng, *, input_cfg, batch_sharding, dtype):
  """The normalised, augmented batch (see `data.Input`): (images, targets, dropout rng);
  `targets` holds the `labels`, and for a mixed batch what data/batch_augment.mix returns."""
  # fold_in the step: a resumed run draws the same numbers.
  step_rng = jax.random.fold_in(rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  if 'indices' in batch:  # In memory: gather from the device-resident split, augment here.
    images = jax.lax.with_sharding_constraint(data['train_images'][batch['indices']],
                                              batch_sharding)
    labels = data['train_labels'][batch['indices']]
    x = memory.normalize(images, data['mean'], data['std'])
    x = memory.augment(x, augment_rng, crop_padding=input_cfg.crop_padding,
                               flip=input_cfg.flip).astype(dtype)
  else:  # Streamed: already cropped and flipped by the host workers.
    labels = batch['labels']
    x = memory.normalize(batch['images'], data['mean'], data['std'], dtype)
  targets = {'labels': labels}
  # Random erasing, Mixup and CutMix (off by default), from their own rng so the papers'
  # crops and flips stay as they were.
  erase_rng, mix_rng = jax.random.split(jax.random.fold_in(step_rng, 1))
  if input_cfg.get('random_erasing', 0):
    x = batch_augment.random_erase(x, erase_rng, input_cfg.random_erasing)
  if input_cfg.get('mixup_alpha', 0) or input_cfg.get('cutmix_alpha', 0):
    x, mixed_labels, weight = batch_augment.mix(
        x, labels, mix_rng, mixup_alpha=input_cfg.mixup_alpha,
        cutmix_alpha=input_cfg.cutmix_alpha, prob=input_cfg.mix_prob,
        cutmix_prob=input_cfg.cutmix_prob)
    targets.update(mixed_labels=mixed_labels, weight=weight)
  return x, targets, dropout_rng


def _loss(model, model_state, x, targets, dropout_rng, label_smoothing=0.0, count=None):
  """The mean training loss over `count` examples (default: this batch's) as a function of the
  parameters; train error against the unmixed labels."""
  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, **model_state}, x, train=True,
                                   rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    metrics = classification_metrics(logits, targets['labels'])
    if label_smoothing or 'mixed_labels' in targets:
      metrics['loss'] = losses.train_loss_sum(logits, targets, label_smoothing)
    return metrics['loss'] / (count or x.shape[0]), (metrics, new_vars)
  return loss_fn


def _batch_and_loss(state, data, batch, rng, *, model, label_smoothing=0.0, **batch_kw):
  """Builds the batch; returns the loss as a function of the parameters."""
  x, targets, dropout_rng = _batch(state, data, batch, rng, **batch_kw)
  return _loss(model, state.model_state, x, targets, dropout_rng, label_smoothing)


def _accumulated_grads(state, data, batch, rng, accumulate_steps, *, model, label_smoothing=0.0,
                       **batch_kw):
  """Gradient of the mean loss over the batch from `accumulate_steps` micro-batches in turn
  (lax.scan: one micro-batch's activations in memory at a time), summed: the large batch's
  gradient. Without BatchNorm it is the one-step gradient up to float rounding. With it, each
  micro-batch is normalised by its own statistics and updates the running averages in turn
  (accumulate_steps updates a step), as a PyTorch loop of micro-batch backward passes does.
  The batch is built and augmented whole first (Mixup pairs examples across micro-batches);
  micro-batch i takes examples i, i + k, ..., so each device's rows split evenly."""
  x, targets, dropout_rng = _batch(state, data, batch, rng, **batch_kw)
  k, count = accumulate_steps, x.shape[0]
  micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1),
                       (x, targets))

  def one(carry, inputs):
    grads, model_state = carry
    (x_i, targets_i), i = inputs
    x_i = jax.lax.with_sharding_constraint(x_i, batch_kw['batch_sharding'])
    loss_fn = _loss(model, model_state, x_i, targets_i, jax.random.fold_in(dropout_rng, i),
                    label_smoothing, count)
    g, (metrics, new_vars) = jax.grad(loss_fn, has_aux=True)(state.params)
    return (jax.tree.map(jnp.add, grads, g), {**model_state, **new_vars}), metrics
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, model_state), metrics = jax.lax.scan(one, (zeros, state.model_state),
                                               (micro, jnp.arange(k)))
  return grads, jax.tree.map(lambda m: jnp.sum(m, 0), metrics), model_state


def _apply_gradients(state, grads, new_vars, metrics, tx, skip_nonfinite=False, ema_decay=0.0,
                     ema_warmup=True):
  """The update, and two metrics that say whether it was finite: `nonfinite` (0 or 1, a
  count once summed) and `first_nonfinite` (this step, or int32 max; a min once combined).
  With `skip_nonfinite`, a non-finite update is not applied (only the step advances).
  A state with an `ema` moves it towards the new weights by `ema_decay` (cvjax/ema.py)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      model_state={**state.model_state, **new_vars}, opt_state=opt_state)
  if state.ema is not None:
    new = new.replace(ema=ema_lib.update(state.ema, new.params, new.model_state, state.step,
                                         ema_decay, ema_warmup))
  finite = (jnp.isfinite(metrics['loss']) & checkpointing.all_finite(grads) &
            checkpointing.all_finite(new))
  if skip_nonfinite:
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                       state.replace(step=state.step + 1))
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0), metrics)  # Skipped: uncounted.
  return new, {**metrics, 'nonfinite': 1 - finite.astype(jnp.int32),
               'first_nonfinite': jnp.where(finite, jnp.iinfo(jnp.int32).max, new.step)}


def accumulate(acc, metrics):
  """Adds one step's metrics to the sums since the last log (on the device); for a population,
  each member's, elementwise."""
  return {k: jnp.minimum(v, metrics[k]) if k == 'first_nonfinite' else v + metrics[k]
          for k, v in acc.items()}


def train_step(state, data, batch, rng, *, tx, skip_nonfinite=False, accumulate_steps=1,
               ema_decay=0.0, ema_warmup=True, **batch_kw):
  """One SGD step on `batch` (indices into `data`, or streamed images and labels); with
  `accumulate_steps` > 1, from that many micro-batches (`_accumulated_grads`)."""
  if accumulate_steps > 1:
    grads, metrics, new_vars = _accumulated_grads(state, data, batch, rng, accumulate_steps,
                                                  **batch_kw)
  else:
    loss_fn = _batch_and_loss(state, data, batch, rng, **batch_kw)
    grads, (metrics, new_vars) = jax.grad(loss_fn, has_aux=True)(state.params)
  return _apply_gradients(state, grads, new_vars, metrics, tx, skip_nonfinite, ema_decay,
                          ema_warmup)


def train_forward(state, data, batch, rng, **batch_kw):
  """The forward half of `train_step`: returns the backward pass as a function whose
  residuals (the saved activations) are arrays, so it can leave this jitted program."""
  loss_fn = _batch_and_loss(state, data, batch, rng, **batch_kw)
  _, backward, (metrics, new_vars) = jax.vjp(loss_fn, state.params, has_aux=True)
  return backward, metrics, new_vars


def train_backward(state, backward, new_vars, metrics, *, tx, skip_nonfinite=False,
                   ema_decay=0.0, ema_warmup=True, accumulate_steps=1):
  """The backward half of `train_step`, and the update (never with micro-batches:
  `split_backward`)."""
  del accumulate_steps
  (grads,) = backward(jnp.ones((), jnp.float32))
  return _apply_gradients(state, grads, new_vars, metrics, tx, skip_nonfinite, ema_decay,
                          ema_warmup)


def batch_args(model, config, mesh):
  """The static arguments of `_batch_and_loss`, shared by every step that builds a batch."""
  return dict(model=model, input_cfg=config.input, batch_sharding=NamedSharding(
      mesh, P('data')), dtype=jnp.dtype(config.train.compute_dtype),
              label_smoothing=config.train.get('label_smoothing', 0.0))


def update_args(config):
  """The static arguments of the update (`_apply_gradients`), and the step's micro-batches."""
  return dict(skip_nonfinite=config.train.get('skip_nonfinite', False),
              accumulate_steps=config.train.get('accumulate_steps', 1),
              ema_decay=config.train.get('ema_decay', 0.0),
              ema_warmup=config.train.get('ema_warmup', True))


def split_backward(config):
  """Whether the train step is two XLA programs, forward and backward: `train.split_backward`,
  or where the config leaves it unset, whether the backend is CPU. XLA:CPU then cannot fuse
  (and so re-compute) forward work into the backward pass, which made the ResNet-20 step
  faster (docs/performance.md); elsewhere the one-program step is the plain, unmeasured default.
  Same result up to float rounding. Gradient accumulation (train.accumulate_steps > 1) is always
  one program: its micro-batches' forward and backward passes alternate."""
  if config.train.get('accumulate_steps', 1) > 1:
    return False
  split = config.train.get('split_backward')
  return jax.default_backend() == 'cpu' if split is None else bool(split)


def jit_train_step(model, tx, config, mesh, state_sharding=None):
  """The train step `(state, data, batch, rng) -> (state, metrics)`, jit-compiled: one
  program, or forward and backward as two (`split_backward`). The new state keeps
  `state_sharding` (cvjax.sharding.state_sharding; default: replicated)."""
  replicated = NamedSharding(mesh, P())
  state_sharding = replicated if state_sharding is None else state_sharding
  batch_kw = batch_args(model, config, mesh)
  if not split_backward(config):
    return jax.jit(functools.partial(train_step, tx=tx, **update_args(config), **batch_kw),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  forward = jax.jit(functools.partial(train_forward, **batch_kw))
  backward = jax.jit(functools.partial(train_backward, tx=tx, **update_args(config)),
                     out_shardings=(state_sharding, replicated), donate_argnums=(0,))

  def step(state, data, batch, rng):
    vjp, metrics, new_vars = forward(state, data, batch, rng)
    return backward(state, vjp, new_vars, metrics)
  return step


def member_sharding(s):
  """Whether a population's members are split over the devices (each member's batch on one
  device: many members) rather than each member's batch (few members). Members must fill the
  devices evenly, group by group."""
  n = s.mesh.size
  return s.population and n > 1 and all(len(g.members) % n == 0 for g in s.groups)


def state_sharding(s):
  """Where the train state lives: a population's replicated or split along its member axis;
  one run's by cvjax.sharding's rules (replicated unless config.mesh splits it)."""
  if member_sharding(s):
    return NamedSharding(s.mesh, P('data'))
  if s.population:
    return NamedSharding(s.mesh, P())
  return sharding_lib.state_sharding(s.abstract_state, s.mesh, s.config)


def _population_parts(s):
  """(vmap with the population's in_axes and member placement, a group's (batch arguments,
  update arguments) of its steps, from its own config: population.vary may change a recipe)."""
  split = member_sharding(s)
  # Inside the vmap each member's batch is split over the devices, or, when the members are,
  # whole on its member's device (the vmap then places the member axis on 'data').
  sharding = NamedSharding(s.mesh, P() if split else P('data'))

  def args(g):
    config = g.members[0].config
    return (dict(batch_args(g.model, config, s.mesh), batch_sharding=sharding),
            update_args(config))
  vmap = functools.partial(jax.vmap, spmd_axis_name='data' if split else None)
  return vmap, args


def _concat_members(metrics):
  return jax.tree.map(lambda *m: jnp.concatenate(m), *metrics)


def population_step(s):
  """The train step of a population: `jax.vmap` of `train_step` over each group's members, all
  groups in one program; `(states, data, batches, rngs)` are dicts by group, the metrics one
  array per metric with a member axis (members in order)."""
  vmap, args = _population_parts(s)
  steps = {key: vmap(functools.partial(train_step, tx=g.tx, **args(g)[1], **args(g)[0]),
                     in_axes=(0, None, 0, 0))
           for key, g in zip(s.state_keys, s.groups)}

  def step(states, data, batches, rngs):
    outs = {k: f(states[k], data, batches[k], rngs[k]) for k, f in steps.items()}
    return {k: st for k, (st, _) in outs.items()}, _concat_members([m for _, m in outs.values()])
  return step


def jit_population_split_step(s):
  """`population_step` as two programs, forward and backward (`split_backward`), each a vmap
  of `train_forward` / `train_backward` by group."""
  vmap, args = _population_parts(s)
  fwd = {key: vmap(functools.partial(train_forward, **args(g)[0]),
                   in_axes=(0, None, 0, 0)) for key, g in zip(s.state_keys, s.groups)}
  bwd = {key: vmap(functools.partial(train_backward, tx=g.tx, **args(g)[1]))
         for key, g in zip(s.state_keys, s.groups)}
  forward = jax.jit(lambda states, data, batches, rngs: {
      k: f(states[k], data, batches[k], rngs[k]) for k, f in fwd.items()})

  def backward_all(states, outs):
    new = {}
    for k, f in bwd.items():
      vjp, metrics, new_vars = outs[k]
      new[k] = f(states[k], vjp, new_vars, metrics)
    return {k: st for k, (st, _) in new.items()}, _concat_members([m for _, m in new.values()])
  sharding = state_sharding(s)
  backward = jax.jit(backward_all, out_shardings=(sharding, sharding), donate_argnums=(0,))
  return lambda states, data, batches, rngs: backward(states, forward(states, data, batches,
                                                                      rngs))


def multi_step(step, k):
  """`k` steps of `step` in one program, a `lax.scan` over the batches' leading axis; returns
  the metrics summed over the k steps (as `accumulate` would), so the host dispatches once."""
  def steps(state, data, batches, rng):
    state, metrics = jax.lax.scan(lambda st, b: step(st, data, b, rng), state, batches, length=k)
    return state, {key: jnp.min(v, 0) if key == 'first_nonfinite' else jnp.sum(v, 0)
                   for key, v in metrics.items()}
  return steps


def jit_train_steps(s, k=1):
  """`(state, data, batch, rng) -> (state, metrics)` for `k` steps (`train.steps_per_call`;
  the batch then has a leading axis of k), jit-compiled; a single step may be two programs
  (`split_backward`), k steps are one."""
  if k == 1 and not s.population:  # One program or split, as `jit_train_step` decides.
    return jit_train_step(s.model, s.tx, s.config, s.mesh, state_sharding(s))
  if k == 1 and split_backward(s.config):
    return jit_population_split_step(s)
  if s.population:
    step = population_step(s)
  else:
    step = functools.partial(train_step, tx=s.tx, **update_args(s.config),
                             **batch_args(s.model, s.config, s.mesh))
  sharding = state_sharding(s)
  metrics = sharding if s.population else NamedSharding(s.mesh, P())
  return jax.jit(multi_step(step, k) if k > 1 else step, out_shardings=(sharding, metrics),
                 donate_argnums=(0,))


def indices_batch(s, step, k):
  """The batch argument of steps [step, step + k) on in-memory data: each member's example
  indices in its own seed's data order, [k, members, batch] with the axes a single step or a
  single run does not have left out, placed as the train step wants them."""
  def one(t):
    if not s.population:
      return s.input.train_indices(s.config.seed, t)
    return {key: np.stack([s.input.train_indices(m.config.seed, t) for m in g.members])
            for key, g in zip(s.state_keys, s.groups)}
  batch = one(step) if k == 1 else population.stack([one(t) for t in range(step, step + k)])
  members = (('data', None) if member_sharding(s) else (None, 'data')) if s.population else (
      'data',)
  sharding = NamedSharding(s.mesh, P(*(None,) * (k > 1), *members))
  return jax.tree.map(lambda x: {'indices': jax.device_put(x, sharding)}, batch)


def population_rngs(s):
  """(init rngs, train rngs) by group: each member's, derived from its seed as a run alone."""
  def keys(g, i):
    return jnp.stack([jax.random.split(jax.random.key(m.config.seed))[i] for m in g.members])
  return ({k: keys(g, 0) for k, g in zip(s.state_keys, s.groups)},
          {k: keys(g, 1) for k, g in zip(s.state_keys, s.groups)})


def state_initializer(model, tx, input_shape, dtype, ema=False):
  """`rng -> TrainState`: for jax.eval_shape (shapes only) and for jit (built in place).
  `ema`: with a moving average of the weights (train.ema_decay)."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *input_shape), dtype), train=False)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params),
                      ema=ema_lib.init(params, variables) if ema else None)
  return init


def with_ema_weights(state):
  """The state with its moving average in place of the weights, for the eval step (the same
  structure, so the same compiled program)."""
  return state.replace(params=state.ema['params'], model_state=state.ema['model_state'])


def init_state(init, rng, sharding):
  """`init(rng)` built in place, compiled at XLA's lowest optimisation level: it runs once, and
  optimising it made the compile ~4x slower (ResNet-20, LeNet-5; same values up to 1 ulp)."""
  lowered = jax.jit(init, out_shardings=sharding).lower(rng)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})(rng)


def eval_step(state, test, batch, *, model, batch_size, batch_sharding, dtype, crops=1,
              crop_size=None, padding=0, flip=False):
  """Metric sums over one test batch: `{'index': i}`, the i-th slice of the padded
  device-resident test set, or streamed `{'images', 'labels', 'mask'}`. With `crops=10`
  the logits are averaged over `memory.ten_crop` views of size `crop_size`, cut
  from the images zero-padded (after normalisation) by `padding`; with `flip`, over the
  image and its mirror image. Returns the metric sums,
  and the top-5 classes of each example (best first) with the probability of the first."""
  if 'index' in batch:
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, batch['index'] * batch_size, batch_size)
    images, labels, mask = take(test['images']), take(test['labels']), take(test['mask'])
  else:
    images, labels, mask = batch['images'], batch['labels'], batch['mask']
  images = jax.lax.with_sharding_constraint(images, batch_sharding)
  x = memory.normalize(images, test['mean'], test['std']).astype(dtype)
  apply = lambda x: model.apply({'params': state.params, **state.model_state}, x, train=False)
  if crops == 1 and flip:
    logits = jnp.mean(jax.lax.map(apply, jnp.stack([x, x[:, :, ::-1]])), axis=0)
  elif crops == 1:
    logits = apply(x)
  else:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    logits = jnp.mean(jax.lax.map(apply, memory.ten_crop(x, crop_size)), axis=0)
  metrics = classification_metrics(logits, labels, mask)
  probabilities, top5 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)),
                                      min(5, logits.shape[-1]))
  return metrics, (top5, probabilities[:, 0])


EVAL_PROGRESS_EVERY_S = 5.0


def evaluate(p_eval_step, state, test_data, batches, num_test, num_classes,
             progress_every_s=EVAL_PROGRESS_EVERY_S):
  """Test metrics over every example exactly once (the padding is masked out; a population's:
  one value per member), the top-5
  predictions for each test example ([examples, 5], best first; `batches` from
  `Input.eval_batches()`), and each example's probability for its top class. Logs the images
  done and their rate every `progress_every_s` seconds (an evaluation of a large net on a CPU
  takes minutes)."""
  outs, last_note, last_done = [], time.perf_counter(), 0
  for batch in batches:
    outs.append(p_eval_step(state, test_data, batch))
    if len(outs) > 1:  # One batch in flight: the host keeps pace with the device, so it can tell.
      jax.block_until_ready(outs[-2][0]['count'])
    if len(outs) > 1 and time.perf_counter() - last_note >= progress_every_s:
      done = int(sum(np.ravel(c)[0] for c in jax.device_get([o[0]['count'] for o in outs[:-1]])))
      now = time.perf_counter()
      logging.info('evaluating: %d/%d test images, %.0f img/s', done, num_test,
                   (done - last_done) / (now - last_note))
      last_note, last_done = now, done
  sums, predictions = jax.device_get(([o[0] for o in outs], [o[1][0] for o in outs]))
  # A population's outputs have a leading member axis: examples are the second-last axis.
  confidence = np.concatenate(jax.device_get([o[1][1] for o in outs]), axis=-1)[..., :num_test]
  sums = jax.tree.map(lambda *x: sum(x), *sums)
  out = {'test/loss': sums['loss'] / sums['count'], 'test/error': sums['errors'] / sums['count'],
         'test/count': sums['count']}
  if num_classes > 5:
    out['test/top5_error'] = sums['top5_errors'] / sums['count']
  return out, np.concatenate(predictions, axis=-2)[..., :num_test, :], confidence


def evaluate_ema(p_eval_step, state, test_data, inp):
  """`test/ema_loss`, `test/ema_error` (and `test/ema_top5_error`) of the moving average of
  the weights (a population's: by group, as `evaluate`); {} for a state without one."""
  if isinstance(state, dict):  # Every member has one or none: the train fields are shared.
    if any(st.ema is None for st in state.values()):
      return {}
    ema_state = {k: with_ema_weights(st) for k, st in state.items()}
  elif state.ema is None:
    return {}
  else:
    ema_state = with_ema_weights(state)
  metrics, _, _ = evaluate(p_eval_step, ema_state, test_data, inp.eval_batches(), inp.num_test,
                           inp.num_classes)
  return {f'test/ema_{k[len("test/"):]}': v for k, v in metrics.items() if k != 'test/count'}


def grad_norms(state, data, batch, rng, **batch_kw):
  """Gradient norm of every layer's kernel, in forward order, and the global norm, on one
  batch (a diagnostic: run every `train.grad_norm_every_steps`, it leaves the state alone)."""
  loss_fn = _batch_and_loss(state, data, batch, rng, **batch_kw)
  grads, _ = jax.grad(loss_fn, has_aux=True)(state.params)
  norms = {'train/grad_norm': optax.global_norm(grads)}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] == 'kernel':
      norms['grad_norm/' + '/'.join(names[:-1])] = jnp.linalg.norm(g)
  return norms


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
  """Rejects values the loop would misread, before the run writes anything."""
  t = config.train
  for key in ('batch_size', 'eval_batch_size'):
    b = t[key]
    if b <= 0 or b % num_devices:
      raise UserError(f'train.{key}={b} must be a positive multiple of the {num_devices} '
                      'devices the batch is split over.')
  k = t.get('accumulate_steps', 1)
  if isinstance(k, int) and k > 1 and t.batch_size % (k * num_devices):
    raise UserError(f'train.batch_size={t.batch_size} does not split into '
                    f'train.accumulate_steps={k} micro-batches over {num_devices} device(s): '
                    f'use a multiple of {k * num_devices}.')
  if t.compute_dtype not in ('float32', 'bfloat16'):
    raise UserError(f'train.compute_dtype={t.compute_dtype!r}; expected float32 or bfloat16.')
  at_least = {
      'log_every_steps': (1, 'log every N steps'),
      'keep_checkpoints': (1, 'how many of the latest checkpoints to keep'),
      'checkpoint_every_steps': (0, 'save every N steps; 0: only at the end and on preemption'),
      'eval_every_steps': (0, 'evaluate every N steps; 0: once per epoch'),
      'grad_norm_every_steps': (0, 'log gradient norms every N steps; 0: off'),
      'steps_per_call': (1, 'train steps per dispatch of the jitted loop'),
  }
  for key, (low, meaning) in at_least.items():
    value = t.get(key, low)
    if not isinstance(value, int) or value < low:
      raise UserError(f'train.{key}={value!r}; expected an integer >= {low} ({meaning}).')
  if t.num_steps is not None and t.num_steps <= 0:
    raise UserError(f'train.num_steps={t.num_steps}; expected a positive number of steps (or '
                    'leave it unset and set train.num_epochs).')
  if t.num_steps is None and not (_is_number(t.num_epochs) and t.num_epochs > 0):
    raise UserError(f'train.num_epochs={t.num_epochs!r}; expected a positive number (or set '
                    'train.num_steps).')
  data_lib.eval_flip(config)
  check_values(config)


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_values(config):
  """Signs, ranges and types of the optimizer, schedule, input and seed fields: a negative
  learning rate or a boundary outside the run trains without a word of warning."""
  o, sch, inp, t = config.optimizer, config.schedule, config.input, config.train
  numbers = [  # (field, value, test, what is expected)
      ('optimizer.learning_rate', o.learning_rate, lambda v: v > 0, 'a positive number'),
      ('optimizer.weight_decay', o.get('weight_decay', 0), lambda v: v >= 0,
       'a number >= 0 (0: off)'),
      ('optimizer.momentum', o.get('momentum', 0), lambda v: 0 <= v < 1,
       'a number in [0, 1) (0: plain SGD)'),
      ('schedule.decay_factor', sch.get('decay_factor', 1), lambda v: v > 0,
       'a positive factor (0.1: /10 at each boundary)'),
      ('schedule.power', sch.get('power', 1), lambda v: v > 0,
       'a positive exponent of the polynomial schedule'),
      ('schedule.end_value', sch.get('end_value', 0), lambda v: 0 <= v <= o.learning_rate,
       f'a learning rate in [0, optimizer.learning_rate={o.learning_rate}]'),
      ('optimizer.b1', o.get('b1', 0.9), lambda v: 0 <= v < 1, 'a number in [0, 1)'),
      ('optimizer.b2', o.get('b2', 0.999), lambda v: 0 <= v < 1, 'a number in [0, 1)'),
      ('optimizer.eps', o.get('eps', 1e-8), lambda v: v >= 0, 'a number >= 0'),
      ('optimizer.trust_coefficient', o.get('trust_coefficient', 1e-3), lambda v: v > 0,
       "a positive number (LARS's eta, 0.001)"),
      ('train.label_smoothing', t.get('label_smoothing', 0), lambda v: 0 <= v < 1,
       'a number in [0, 1) (0: off; 0.1 in torchvision\'s recipe)'),
      ('train.ema_decay', t.get('ema_decay', 0), lambda v: 0 <= v < 1,
       'a per-step decay in [0, 1) (0: no moving average; e.g. 0.999)'),
      ('input.random_erasing', inp.get('random_erasing', 0), lambda v: 0 <= v <= 1,
       'a probability in [0, 1] (0: off)'),
      ('input.mixup_alpha', inp.get('mixup_alpha', 0), lambda v: v >= 0,
       'a number >= 0 (0: off; 0.2 in torchvision\'s recipe)'),
      ('input.cutmix_alpha', inp.get('cutmix_alpha', 0), lambda v: v >= 0,
       'a number >= 0 (0: off; 1.0 in torchvision\'s recipe)'),
      ('input.mix_prob', inp.get('mix_prob', 1), lambda v: 0 <= v <= 1,
       'a probability in [0, 1]'),
      ('input.cutmix_prob', inp.get('cutmix_prob', 0.5), lambda v: 0 <= v <= 1,
       'a probability in [0, 1]'),
  ]
  for field, value, test, expected in numbers:
    if not _is_number(value) or not test(value):
      raise UserError(f'{field}={value!r}; expected {expected}.')
  integers = [  # (field, value, low, high, meaning)
      ('schedule.warmup_steps', sch.get('warmup_steps', 0), 0, None, 'steps of linear warm-up'),
      ('input.crop_padding', inp.get('crop_padding', 0), 0, 256,
       'pixels of zero padding for random crops; 0: off'),
      ('input.image_size', inp.get('image_size', 0), 0, 4096,
       'the side of the input images; 0: as stored'),
      ('seed', config.get('seed', 0), 0, 2 ** 31 - 1, 'JAX and grain take 32-bit seeds'),
      ('train.accumulate_steps', t.get('accumulate_steps', 1), 1, None,
       'micro-batches per update; 1: off'),
  ]
  for field, value, low, high, meaning in integers:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
        or (high is not None and value > high)):
      limit = f'>= {low}' if high is None else f'in [{low}, {high}]'
      raise UserError(f'{field}={value!r}; expected an integer {limit} ({meaning}).')
  auto = inp.get('auto_augment', '')
  if auto not in ('', 'trivial_augment_wide'):
    raise UserError(f'input.auto_augment={auto!r}; expected \'\' (off) or trivial_augment_wide '
                    '(TrivialAugment, torchvision\'s TrivialAugmentWide; streamed input).')
  boundaries = sch.get('boundaries', ())
  if sch.name == 'piecewise' and (not isinstance(boundaries, (tuple, list)) or not all(
      _is_number(b) and 0 <= b <= 1 for b in boundaries)):
    raise UserError(f'schedule.boundaries={boundaries!r}; expected fractions of the run in '
                    '[0, 1], e.g. (0.5, 0.75): /10 at half and three quarters of the steps.')


def check_finite(acc, mngr):
  """Stops the run when a step since the last check was non-finite, naming the first one;
  the state is then never saved, so the newest checkpoint stays the last good one."""
  count, first = jax.device_get((acc['nonfinite'], acc['first_nonfinite']))
  count, first = int(np.sum(count)), int(np.min(first))  # A population's: over its members.
  if count:
    mngr.wait_until_finished()
    last = mngr.latest_step()
    raise UserError(
        f'the training loss or gradients became non-finite (nan or inf) at step {first}, and '
        f'the run stopped there without saving that state. '
        + (f'The newest checkpoint (step {last}) is good; a re-run resumes from it. ' if last
           else 'No checkpoint was saved before it; a re-run starts over. ')
        + 'Try a lower optimizer.learning_rate, or train.skip_nonfinite=True to skip such '
        'updates.')


def _fmt_time(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def layer_order(model, variables, x):
  """Paths of the conv and dense layers in the order the forward pass calls them."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (nn.Conv, nn.Dense)):
      order.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  return order


@dataclasses.dataclass
class Group:
  """Members whose configs differ only by the seed: one model and optimizer, vmapped."""
  members: list  # population.Member
  model: Any
  schedule: Any
  tx: Any
  init: Any  # rng -> one member's TrainState.
  abstract_state: Any  # One member's.


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before touching the workdir. A population's
  `init`, `abstract_state` and train step hold every group's state, by `state_keys`; `model`,
  `schedule` and `tx` are then those of its first group."""
  config: Any
  mesh: Any
  input: data_lib.Input
  model: Any
  schedule: Any
  tx: Any
  steps_per_epoch: int
  total_steps: int
  init: Any  # rng -> TrainState (a population: {key: rngs} -> {key: stacked TrainState}).
  abstract_state: Any
  identity: dict  # What a checkpoint must match: the model, the data and its input shape.
  groups: list = dataclasses.field(default_factory=list)  # A population's; [] for one run.

  @property
  def population(self):
    return bool(self.groups)

  @property
  def members(self):
    return [m for g in self.groups for m in g.members]

  @property
  def state_keys(self):
    return [f'group{i}' for i in range(len(self.groups))]


def build_state(config, num_classes, input_shape, total_steps, mesh=None):
  """(model, schedule, optimizer, initializer, abstract train state) of `config` for
  `num_classes` classes of `input_shape` images: what a checkpoint holds, built without the
  data (cvjax.import_weights writes checkpoints with it). On a `mesh` of several devices,
  grouped convolutions run per device (cvjax.sharding.grouped_per_device)."""
  dtype = jnp.dtype(config.train.compute_dtype)
  model = models.create_model(config.model, num_classes=num_classes, dtype=dtype,
                              remat=config.train.get('remat'),
                              conv_general_dilated=sharding_lib.grouped_per_device(
                                  convolution.for_config(config), mesh))
  # Jitted: the loop logs schedule(step) from the host, and op-by-op it compiled each op (~1 s).
  schedule = jax.jit(optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                         total_steps))
  tx = optim.make_optimizer(config.optimizer, schedule)
  init = state_initializer(model, tx, input_shape, dtype,
                           ema=config.train.get('ema_decay', 0.0) > 0)
  return model, schedule, tx, init, jax.eval_shape(init, jax.random.key(0))


def run_identity(config, num_classes, input_shape, dataset=None):
  """What a checkpoint must match to be restored: the model, the data and its input shape.
  Without `dataset` (imported weights) it matches any data of that input shape and number of
  classes: checkpointing.check_identity compares the fields both identities record. The
  optimizer's, the schedule's and the run length's settings are recorded, not matched: they may
  change when a run resumes, as long as the train state keeps its layout
  (checkpointing.check_layout)."""
  identity = {'model': config.model.to_dict(), 'num_classes': num_classes,
              'input_shape': list(input_shape), checkpointing.RESUMABLE: json.loads(json.dumps({
                  'optimizer': config.optimizer.to_dict(), 'schedule': config.schedule.to_dict(),
                  'num_steps': config.train.num_steps, 'num_epochs': config.train.num_epochs,
                  'batch_size': config.train.batch_size}))}  # As saved: tuples as lists.
  return identity if dataset is None else {**identity, 'dataset': dataset}


def setup(config, devices=None) -> Setup:
  mesh = sharding_lib.make_mesh(config, devices)
  check_config(config, mesh.shape['data'])
  if population.is_population(config) and (mesh.shape['model'] > 1 or config.mesh.fsdp):
    raise UserError('mesh.model and mesh.fsdp split one run\'s parameters; a population '
                    '(population.seeds > 1 or population.vary) splits its members or their '
                    'batches over the devices: leave mesh.model=1 and mesh.fsdp=False.')
  if config.train.compute_dtype == 'bfloat16' and mesh.devices.flat[0].platform == 'cpu':
    logging.warning('train.compute_dtype=bfloat16 on a CPU is slower than float32: XLA:CPU has '
                    'no fast bfloat16 convolutions and oneDNN takes only float32 ones here '
                    '(ResNet-20: 246 img/s against 369 in float32, docs/performance.md). '
                    'bfloat16 is a GPU/TPU setting; on a CPU keep float32.')
  streamed = data_lib.pipeline_for(config.dataset) != 'memory'
  if streamed and config.train.get('steps_per_call', 1) > 1:
    raise UserError(f'train.steps_per_call={config.train.steps_per_call} loops over batches '
                    'held on the device; this dataset streams from disk (dataset.pipeline), one '
                    'batch per call: leave train.steps_per_call=1.')
  if population.is_population(config) and streamed:
    raise UserError('a population (population.seeds > 1 or population.vary) trains on data '
                    'held on the device; this dataset streams from disk (dataset.pipeline). '
                    'Train its members as separate runs instead, e.g. a sweep over seed.')
  inp = data_lib.make_input(config, mesh)
  input_shape = tuple(inp.image_shape)
  steps_per_epoch, total_steps = steps_for(config, inp.num_train)
  model, schedule, tx, init, abstract_state = build_state(config, inp.num_classes, input_shape,
                                                          total_steps, mesh)
  identity = run_identity(config, inp.num_classes, input_shape, inp.identity)
  if not population.is_population(config):
    return Setup(config, mesh, inp, model, schedule, tx, steps_per_epoch, total_steps, init,
                 abstract_state, identity)
  groups = [Group(ms, *build_state(ms[0].config, inp.num_classes, input_shape, total_steps))
            for ms in population.group_members(population.members(config))]
  keys = [f'group{i}' for i in range(len(groups))]
  stacked = lambda a, n: jax.ShapeDtypeStruct((n, *a.shape), a.dtype)

  def init_population(rngs):
    return {k: jax.vmap(g.init)(rngs[k]) for k, g in zip(keys, groups)}
  abstract = {k: jax.tree.map(lambda a, n=len(g.members): stacked(a, n), g.abstract_state)
              for k, g in zip(keys, groups)}
  identity['population'] = json.loads(json.dumps({  # As saved: tuples as lists.
      'members': [m.name for g in groups for m in g.members],
      'models': [g.members[0].config.model.to_dict() for g in groups]}))
  return Setup(config, mesh, inp, groups[0].model, groups[0].schedule, groups[0].tx,
               steps_per_epoch, total_steps, init_population, abstract, identity, groups)


def jit_evaluation(s: Setup, state_sharding):
  """(jitted eval step, the eval step's device-resident `test` data). A population's step
  evaluates every member on each batch (vmap by group): its outputs gain a member axis."""
  test_data = jax.device_put(s.input.test_data, NamedSharding(s.mesh, P()))
  split = member_sharding(s)
  kw = dict(batch_size=s.config.train.eval_batch_size,
            batch_sharding=NamedSharding(s.mesh, P() if split else P('data')),
            dtype=jnp.dtype(s.config.train.compute_dtype), crops=data_lib.eval_crops(s.config),
            crop_size=s.input.image_shape[0], padding=s.input.eval_padding,
            flip=data_lib.eval_flip(s.config))
  if not s.population:
    return jax.jit(functools.partial(eval_step, model=s.model, **kw),
                   out_shardings=state_sharding), test_data
  steps = {k: jax.vmap(functools.partial(eval_step, model=g.model, **kw), in_axes=(0, None, None),
                       spmd_axis_name='data' if split else None)
           for k, g in zip(s.state_keys, s.groups)}

  def step(states, test, batch):
    outs = [f(states[k], test, batch) for k, f in steps.items()]
    return jax.tree.map(lambda *x: jnp.concatenate(x), *outs)
  return jax.jit(step, out_shardings=NamedSharding(s.mesh, P())), test_data


def hparams(config):
  """The config's scalar fields, flattened, for TensorBoard's HParams dashboard."""
  flat = {}
  for section, value in config.items():
    items = value.items() if hasattr(value, 'items') else [('', value)]
    for key, v in items:
      if isinstance(v, (bool, int, float, str)):
        flat[f'{section}.{key}' if key else section] = v
  return flat


def train_and_evaluate(config, workdir, *, devices=None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns
  (final train state, final test metrics). Raises preemption.Preempted, after saving a
  checkpoint, when SIGTERM or SIGINT asked the run to stop."""
  run_dir = epath.Path(workdir)  # A local path or gs://... (any etils.epath path).
  if run_dir.exists() and not run_dir.is_dir():
    raise UserError(f'--workdir={workdir} exists and is not a directory.')
  with preemption.watch() as stop_requested:  # Also while the data loads: ~10 s on ImageNet.
    s = setup(config, devices)  # Checks the config and the data; nothing is written before.
    stopped = stop_requested(0)
    if stopped:
      raise preemption.Preempted(0, stopped)
    with run_lock.hold(workdir), checkpointing.saves_finished():
      return train_loop(s, workdir, stop_requested)


def member_dirs(s, workdir):
  """{member: its folder}: an ordinary run's is the workdir ({None: workdir}); a population's
  members each have `members/<name>/`, laid out as an ordinary run's."""
  if not s.population:
    return {None: epath.Path(workdir)}
  return {m.name: epath.Path(workdir) / 'members' / m.name for m in s.members}


def by_member(s, tree):
  """{member: its part} of a host tree whose leaves have a member axis ({None: tree})."""
  if not s.population:
    return {None: tree}
  return {m.name: jax.tree.map(lambda x, i=i: x[i], tree) for i, m in enumerate(s.members)}


def by_member_of_groups(s, trees):
  """{member: its part} of {state key: tree with a member axis} (the train state, grad norms)."""
  if not s.population:
    return {None: trees}
  return {m.name: jax.tree.map(lambda x, i=i: x[i], trees[k])
          for k, g in zip(s.state_keys, s.groups) for i, m in enumerate(g.members)}


def current_step(state):
  steps = [x.step for x in (state.values() if isinstance(state, dict) else [state])]
  return int(max(np.max(x) for x in jax.device_get(steps)))


def train_loop(s: Setup, workdir, stop_requested):
  config = s.config
  sharding = state_sharding(s)
  num_members = len(s.members) or 1
  images_per_step = config.train.batch_size * num_members

  # --- Train state: restored, or built directly in place. ---
  if s.population:
    init_rng, train_rng = population_rngs(s)
  else:
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  run_dir = epath.Path(workdir)
  run_dir.mkdir(parents=True, exist_ok=True)
  checkpointing.check_shared_workdir(workdir)
  mngr = checkpointing.manager(workdir, config.train.keep_checkpoints)
  state = checkpointing.restore_latest(
      mngr, checkpointing.abstract_with_sharding(s.abstract_state, sharding), s.identity)
  if state is None:
    state = init_state(s.init, init_rng, sharding)
  start_step = current_step(state)
  if start_step >= s.total_steps:
    finished = already_finished(s, workdir, start_step)
    if finished is not None:
      return state, finished
  elif start_step:
    logging.info('Resuming from the checkpoint at step %d.', start_step)
  t_start = time.perf_counter()
  is_main = jax.process_index() == 0  # Writes the logs, metrics and results.
  dirs = member_dirs(s, workdir)
  if is_main:
    (run_dir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    for m in s.members:
      dirs[m.name].mkdir(parents=True, exist_ok=True)
      (dirs[m.name] / 'config.json').write_text(m.config.to_json_best_effort(indent=2))
  writers = {name: metric_writer.create(d, resume_step=start_step) for name, d in dirs.items()}
  schedules = ({m.name: g.schedule for g in s.groups for m in g.members} if s.population
               else {None: s.schedule})
  num_params = sum(x.size for x in jax.tree.leaves((s.groups or [s])[0].abstract_state.params))
  logging.info('%s: %d parameters, %d train / %d test examples %s (%s input), %d classes, '
               '%d steps (%d per epoch), %d device(s) in %d process(es).', config.model.name,
               num_params, s.input.num_train, s.input.num_test, s.input.image_shape,
               s.input.pipeline, s.input.num_classes, s.total_steps, s.steps_per_epoch,
               s.mesh.size, jax.process_count())
  if s.population:
    logging.info('A population of %d members in %d group(s), %s: %s.', num_members,
                 len(s.groups), 'members split over the devices' if member_sharding(s) else
                 "each member's batch split over the devices",
                 ', '.join(m.name for m in s.members))
  else:
    logging.info('%s.', sharding_lib.describe(s.abstract_state, sharding, s.mesh))

  # --- Data on the device, and the jitted steps. ---
  replicated = NamedSharding(s.mesh, P())
  device_data = jax.device_put(s.input.train_data, replicated)
  per_call = config.train.get('steps_per_call', 1)
  train_steps = {}  # Jitted, by the number of steps a call takes.
  if s.input.train_indices is None:  # Streamed: the batches from start_step on.
    batches = s.input.train_batches(start_step)
    next_batch = lambda step, k: next(batches)
  else:  # In memory: any steps' indices, made on the host.
    batches = None
    next_batch = functools.partial(indices_batch, s)
  p_eval_step, test_data = jit_evaluation(s, replicated)
  grad_norm_every = config.train.get('grad_norm_every_steps', 0)
  if grad_norm_every:
    p_grad_norms = jit_grad_norms(s)

  # --- The loop. ---
  log_every = config.train.log_every_steps
  eval_every = config.train.eval_every_steps or s.steps_per_epoch
  ckpt_every = config.train.checkpoint_every_steps
  skip_nonfinite = config.train.get('skip_nonfinite', False)
  p_accumulate = jax.jit(accumulate)
  acc, test_metrics, predictions, confidence = None, {}, None, None
  t_last, step_last, excluded, waited = None, start_step, 0.0, 0.0
  saved = [start_step]

  def save(done, state, acc):
    nonlocal excluded
    if saved[-1] == done:
      return
    if acc is not None and not skip_nonfinite:
      check_finite(acc, mngr)
    t0 = time.perf_counter()
    checkpointing.save(mngr, done, state, s.identity)
    for w in writers.values():
      w.sync()  # Logs up to here reach a remote workdir with each checkpoint.
    excluded += time.perf_counter() - t0
    saved.append(done)

  def close_writers():
    for w in writers.values():
      w.close()

  # Each call trains up to `per_call` steps, and stops at the next step that logs, evaluates,
  # checkpoints or measures gradients, so those happen at the same steps whatever per_call is.
  events = [e for e in (log_every, eval_every, ckpt_every, grad_norm_every) if e]
  in_flight, done = None, start_step
  while done < s.total_steps:
    step = done
    k = min([per_call, s.total_steps - step] + [e - step % e for e in events])
    t0 = time.perf_counter()
    batch = next_batch(step, k)
    waited += time.perf_counter() - t0  # Time the step waits on the input.
    if grad_norm_every and step % grad_norm_every == 0:  # The gradient this step will take.
      first = batch if k == 1 else next_batch(step, 1)
      norms = by_member_of_groups(s, jax.device_get(p_grad_norms(state, device_data, first,
                                                                 train_rng)))
      for name, n in norms.items():
        writers[name].write_scalars(step, n)
    if k not in train_steps:
      logging.info('Compiling the train step%s; the first call waits for it (seconds to a '
                   'minute on a CPU).', f' ({k} steps per call)' if k > 1 else '')
      train_steps[k] = jit_train_steps(s, k)
    state, metrics = train_steps[k](state, device_data, batch, train_rng)
    acc = metrics if acc is None else p_accumulate(acc, metrics)
    done = step + k
    # At most two steps in flight: the host waits for the previous one after dispatching
    # this one, so a signal stops the run within a step or two (not a queue of them).
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = metrics['count']

    if t_last is None:  # Compilation and the first step: kept out of images/s.
      jax.block_until_ready(state)
      t_last, step_last, waited = time.perf_counter(), done, 0.0
      logging.info('First step (with compilation) done.')

    log_now = done % log_every == 0 or done == s.total_steps
    eval_now = done % eval_every == 0 or done == s.total_steps
    if (log_now or eval_now) and not skip_nonfinite:
      check_finite(acc, mngr)  # A non-finite state is never logged, evaluated or saved.

    if log_now:
      sums = jax.device_get(acc)  # The only host pull of train metrics: once per log.
      acc = None
      now = time.perf_counter()
      elapsed = now - t_last - excluded
      ips = (done - step_last) * images_per_step / elapsed if done > step_last else 0.0
      logged = {}
      for name, m in by_member(s, sums).items():
        count = m['count'] or np.nan  # 0 when train.skip_nonfinite skipped every step.
        logged[name] = {'train/loss': m['loss'] / count, 'train/error': m['errors'] / count,
                        'train/learning_rate': float(schedules[name](done - 1)),
                        'train/images_per_second': ips,
                        'train/input_wait_fraction': waited / elapsed if elapsed > 0 else 0.0}
        if skip_nonfinite:
          logged[name]['train/skipped_nonfinite'] = m['nonfinite']
        writers[name].write_scalars(done, logged[name])
      eta = (s.total_steps - done) * images_per_step / ips if ips else 0
      first = next(iter(logged.values()))
      logging.info('step %d/%d  %s  lr %.4g  %.0f img/s  input wait %.0f%%  ETA %s', done,
                   s.total_steps, progress_metrics(logged, 'train'), first['train/learning_rate'],
                   ips, 100 * first['train/input_wait_fraction'], _fmt_time(eta))
      t_last, step_last, excluded, waited = now, done, 0.0, 0.0

    if done == s.total_steps:  # Saved before the final evaluation: a stop there loses nothing.
      save(done, state, acc)
      mngr.wait_until_finished()
      logging.info('Saved the final checkpoint (step %d).', done)

    if eval_now:
      t0 = time.perf_counter()
      test_metrics, predictions, confidence = evaluate(
          p_eval_step, state, test_data, s.input.eval_batches(), s.input.num_test,
          s.input.num_classes)
      test_metrics.update(evaluate_ema(p_eval_step, state, test_data, s.input))
      logged = by_member(s, test_metrics)
      for name, m in logged.items():
        writers[name].write_scalars(done, m)
      logging.info('step %d/%d  test %s', done, s.total_steps, progress_metrics(logged, 'test'))
      excluded += time.perf_counter() - t0

    stop = stop_requested(done)  # SIGTERM or SIGINT: save this step and stop.
    if (ckpt_every and done % ckpt_every == 0) or stop:
      save(done, state, acc)
    if stop and done < s.total_steps:
      logging.warning('Stopping after step %d (%s): its checkpoint is saved.', done, stop)
      mngr.wait_until_finished()
      close_writers()
      raise preemption.Preempted(done, stop)

  if batches is not None:
    batches.close()  # Stops the streaming workers.
  mngr.wait_until_finished()
  final = {}
  if current_step(state) >= s.total_steps:
    if predictions is None:  # Nothing left to train: evaluate the restored state.
      logging.info('The checkpoint at step %d is the last of this run; evaluating it.',
                   current_step(state))
      test_metrics, predictions, confidence = evaluate(
          p_eval_step, state, test_data, s.input.eval_batches(), s.input.num_test,
          s.input.num_classes)
      test_metrics.update(evaluate_ema(p_eval_step, state, test_data, s.input))
    final = by_member(s, {k: np.asarray(v) for k, v in test_metrics.items()})
    if is_main:
      results = finish(workdir, s, state, test_metrics, predictions, confidence, writers)
      logging.info('%s', summary_line(
          results, workdir, f'Finished {config.model.name} at step {results["step"]} in '
          f'{_fmt_time(time.perf_counter() - t_start)}'))
  close_writers()
  final = {name: {k: float(v) for k, v in m.items()} for name, m in final.items()}
  return state, final[None] if not s.population else final


def progress_metrics(logged, split):
  """'loss 0.4321  error 12.34%' of one run; of a population, each as 'mean (min-max)' over
  its members, so the line stays one line."""
  parts = []
  for key, fmt, scale in (('loss', '%.4f', 1), ('error', '%.2f%%', 100),
                          ('top5_error', '%.2f%%', 100), ('ema_error', '%.2f%%', 100)):
    values = [m[f'{split}/{key}'] * scale for m in logged.values() if f'{split}/{key}' in m]
    if not values:
      continue
    name = {'top5_error': 'top-5 error', 'ema_error': 'EMA error'}.get(key, key)
    if len(values) == 1:
      parts.append(f'{name} {fmt % values[0]}')
    else:
      mean, low, high = population.summary(values)
      parts.append(f'{name} {fmt % mean} ({fmt % low}-{fmt % high})'.replace('%%', '%'))
  text = '  '.join(parts)
  return text if len(logged) == 1 else f'{text}  over {len(logged)} members'


def jit_grad_norms(s):
  """`grad_norms`, jitted; a population's by group (its layers differ between groups)."""
  replicated = NamedSharding(s.mesh, P())
  kw = batch_args(s.model, s.config, s.mesh)
  if not s.population:
    return jax.jit(functools.partial(grad_norms, **kw), out_shardings=replicated)
  fns = {k: jax.vmap(functools.partial(grad_norms, **{**kw, 'model': g.model,
                                                       'batch_sharding': replicated}),
                     in_axes=(0, None, 0, 0)) for k, g in zip(s.state_keys, s.groups)}
  return jax.jit(lambda st, data, b, r: {k: f(st[k], data, b[k], r[k]) for k, f in fns.items()},
                 out_shardings=replicated)


def summary_line(results, workdir, head):
  """One readable line for the end of a run: `head`, how well it did, what it wrote."""
  if 'members' in results:
    errors = [100 * r['test/error'] for r in results['members'].values()]
    mean, low, high = population.summary(errors)
    std = np.std(errors, ddof=1) if len(errors) > 1 else 0.0
    return (f'{head}: test error {mean:.2f} ± {std:.2f}% over {len(errors)} members (best '
            f'{low:.2f}%, worst {high:.2f}%). Wrote {workdir}/results.json and each member\'s '
            f'results, error analysis and curves in {workdir}/members/; `tensorboard --logdir '
            f'{workdir}` overlays them.')
  top5 = (f', top-5 {100 * results["test/top5_error"]:.2f}%'
          if 'test/top5_error' in results else '')
  train = (f'; train error {100 * results["train/error"]:.2f}% over the last log interval'
           if 'train/error' in results else '')
  return (f'{head}: test error {100 * results["test/error"]:.2f}% ({results["num_mistakes"]} of '
          f'{int(results["test/count"])}){top5}{train}. Wrote {workdir}/results.json and '
          f'{workdir}/error_analysis/; `tensorboard --logdir {workdir}` shows the curves.')


def already_finished(s, workdir, step):
  """The final test metrics of a run that finished at `step` (its results.json), after saying
  so; None when it still has to be evaluated and written (then the caller does that)."""
  results_file = epath.Path(workdir) / 'results.json'
  try:
    results = json.loads(results_file.read_text()) if results_file.exists() else None
  except (OSError, ValueError):
    results = None
  needed = {'test/error', 'test/count', 'num_mistakes'}
  if (jax.process_count() > 1 or not results or results.get('step') != step
      or not (set(results.get('members', {})) == {m.name for m in s.members} and all(
          needed <= set(r) for r in results['members'].values()) if s.population
              else needed <= set(results))):
    return None  # Several processes evaluate together; a missing results.json is rewritten.
  logging.info('%s Nothing to train (this config runs %d steps): re-evaluate with `python -m '
               'cvjax.evaluate --workdir=%s`, or train longer with a larger train.num_epochs.',
               summary_line(results, workdir, f'This run already finished at step {step}'),
               s.total_steps, workdir)
  tests = lambda r: {k: float(v) for k, v in r.items() if k.startswith('test/')}
  if s.population:
    return {name: tests(r) for name, r in results['members'].items()}
  return tests(results)


def finish(workdir, s: Setup, state, test_metrics, predictions, confidence, writers):
  """End of a run: error analysis, HParams, and results.json (which marks the run done); a
  population's for each member, then its own results.json with every member's and their mean
  and standard deviation."""
  dirs, step = member_dirs(s, workdir), current_step(state)
  tests = by_member(s, {k: np.asarray(v) for k, v in test_metrics.items()})
  preds, conf = by_member(s, predictions), by_member(s, confidence)
  groups = ({m.name: (m.config, g) for g in s.groups for m in g.members} if s.population else
            {None: (s.config, s)})
  results = {}
  for name, (config, g) in groups.items():
    writer = writers[name]
    analysis = error_analysis.write(dirs[name], s.input.test_images, s.input.test_labels,
                                    preds[name][:, 0], s.input.class_names, step=step,
                                    writer=writer.tb, confidence=conf[name])
    final = {k: float(v) for k, v in tests[name].items()}
    train_records = [r for r in writer.records() if 'train/error' in r]
    if train_records:
      final['train/error'] = train_records[-1]['train/error']
      final['train/loss'] = train_records[-1]['train/loss']
    writer.write_hparams(hparams(config), final)
    example = jax.ShapeDtypeStruct((1, *s.input.image_shape),
                                   jnp.dtype(config.train.compute_dtype))
    variables = {'params': g.abstract_state.params, **g.abstract_state.model_state}
    results[name] = {'step': step, **final, 'num_mistakes': analysis['num_mistakes'],
                     'num_params': int(sum(p.size for p in jax.tree.leaves(
                         g.abstract_state.params))),
                     'layer_order': layer_order(g.model, variables, example)}
    (dirs[name] / 'results.json').write_text(json.dumps(results[name], indent=1))
  if not s.population:
    return results[None]
  keys = [k for k in results[s.members[0].name] if k.startswith(('test/', 'train/'))]
  table = {k: np.array([r[k] for r in results.values()]) for k in keys}
  out = {'step': step, 'members': results, 'mean': {k: float(v.mean()) for k, v in table.items()},
         'std': {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in table.items()}}
  (epath.Path(workdir) / 'results.json').write_text(json.dumps(out, indent=1))
  return out
