"""The train state and the steps of one run: the train step (one program, or forward and
backward as two), the eval step and the gradient-norm diagnostic. Pure functions of arrays;
`cvjax/jit_steps.py` compiles them for a run or a population, `cvjax/train.py` calls them.

The steps never look at the pipeline: `data.Input` hands them `make_train_batch` and
`make_eval_batch`, which build the model's input from whatever the batch argument holds."""

import functools
from typing import Any

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import optax

from cvjax import checkpointing
from cvjax import ema as ema_lib
from cvjax import losses
from cvjax.data import transforms
from cvjax.ops import convolution


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # The other variable collections: BatchNorm statistics, constants.
  opt_state: Any
  # With train.ema_decay: {'params', 'model_state'}, their moving average (cvjax/ema.py).
  # None is saved as nothing, so checkpoints without it keep their layout.
  ema: Any = None


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


def train_inputs(state, data, batch, rng, *, make_train_batch, input_cfg, batch_sharding,
                 dtype):
  """(images, targets, dropout rng) of this step: the pipeline's batch (`make_train_batch`),
  then random erasing, Mixup and CutMix (off by default). `targets` holds the `labels`, and for
  a mixed batch what data/transforms.mix returns."""
  # fold_in the step: a resumed run draws the same numbers.
  step_rng = jax.random.fold_in(rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  x, labels = make_train_batch(data, batch, augment_rng, sharding=batch_sharding, dtype=dtype,
                               step=state.step)
  targets = {'labels': labels}
  # From their own rng, so the papers' crops and flips stay as they were.
  erase_rng, mix_rng = jax.random.split(jax.random.fold_in(step_rng, 1))
  if input_cfg.random_erasing:
    x = transforms.random_erase(x, erase_rng, input_cfg.random_erasing)
  if input_cfg.mixup_alpha or input_cfg.cutmix_alpha:
    x, mixed_labels, weight = transforms.mix(
        x, labels, mix_rng, mixup_alpha=input_cfg.mixup_alpha,
        cutmix_alpha=input_cfg.cutmix_alpha, prob=input_cfg.mix_prob,
        cutmix_prob=input_cfg.cutmix_prob)
    targets.update(mixed_labels=mixed_labels, weight=weight)
  return x, targets, dropout_rng


def loss_of_params(model, model_state, x, targets, dropout_rng, label_smoothing=0.0, count=None):
  """The mean training loss over `count` examples (default: this batch's) as a function of the
  parameters, with (metrics, new BatchNorm statistics); train error against the unmixed
  labels."""
  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, **model_state}, x, train=True,
                                   rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    metrics = classification_metrics(logits, targets['labels'])
    if label_smoothing or 'mixed_labels' in targets:
      metrics['loss'] = losses.train_loss_sum(logits, targets, label_smoothing)
    return metrics['loss'] / (count or x.shape[0]), (metrics, new_vars)
  return loss_fn


def batch_loss(state, data, batch, rng, *, model, label_smoothing=0.0, **input_kw):
  """This step's loss as a function of the parameters (`loss_of_params` of `train_inputs`)."""
  x, targets, dropout_rng = train_inputs(state, data, batch, rng, **input_kw)
  return loss_of_params(model, state.model_state, x, targets, dropout_rng, label_smoothing)


def _accumulated_grads(state, data, batch, rng, accumulate_steps, *, model, label_smoothing=0.0,
                       **input_kw):
  """Gradient of the mean loss over the batch from `accumulate_steps` micro-batches in turn
  (lax.scan: one micro-batch's activations in memory at a time), summed: the large batch's
  gradient. Without BatchNorm it is the one-step gradient up to float rounding. With it, each
  micro-batch is normalised by its own statistics and updates the running averages in turn
  (accumulate_steps updates a step), as a PyTorch loop of micro-batch backward passes does.
  The batch is built and augmented whole first (Mixup pairs examples across micro-batches);
  micro-batch i takes examples i, i + k, ..., so each device's rows split evenly."""
  x, targets, dropout_rng = train_inputs(state, data, batch, rng, **input_kw)
  k, count = accumulate_steps, x.shape[0]
  micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1),
                       (x, targets))

  def one(carry, inputs):
    grads, model_state = carry
    (x_i, targets_i), i = inputs
    x_i = jax.lax.with_sharding_constraint(x_i, input_kw['batch_sharding'])
    loss_fn = loss_of_params(model, model_state, x_i, targets_i,
                             jax.random.fold_in(dropout_rng, i), label_smoothing, count)
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
  """One SGD step on `batch` (whatever the pipeline's `make_train_batch` reads); with
  `accumulate_steps` > 1, from that many micro-batches (`_accumulated_grads`)."""
  if accumulate_steps > 1:
    grads, metrics, new_vars = _accumulated_grads(state, data, batch, rng, accumulate_steps,
                                                  **batch_kw)
  else:
    loss_fn = batch_loss(state, data, batch, rng, **batch_kw)
    grads, (metrics, new_vars) = jax.grad(loss_fn, has_aux=True)(state.params)
  return _apply_gradients(state, grads, new_vars, metrics, tx, skip_nonfinite, ema_decay,
                          ema_warmup)


def train_forward(state, data, batch, rng, **batch_kw):
  """The forward half of `train_step`: returns the backward pass as a function whose
  residuals (the saved activations) are arrays, so it can leave this jitted program."""
  loss_fn = batch_loss(state, data, batch, rng, **batch_kw)
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


def batch_args(model, config, mesh, make_train_batch):
  """The static arguments of `batch_loss`, shared by every step that builds a train batch."""
  return dict(model=model, make_train_batch=make_train_batch, input_cfg=config.input,
              batch_sharding=NamedSharding(mesh, P('data')),
              dtype=convolution.compute_dtype(config),
              label_smoothing=config.train.label_smoothing)


def update_args(config):
  """The static arguments of the update (`_apply_gradients`), and the step's micro-batches."""
  return dict(skip_nonfinite=config.train.skip_nonfinite,
              accumulate_steps=config.train.accumulate_steps,
              ema_decay=config.train.ema_decay,
              ema_warmup=config.train.ema_warmup)


def split_backward(config):
  """Whether the train step is two XLA programs, forward and backward: `train.split_backward`,
  or where the config leaves it unset, whether the backend is CPU. XLA:CPU then cannot fuse
  (and so re-compute) forward work into the backward pass, which made the ResNet-20 step
  faster (docs/performance.md); elsewhere the one-program step is the plain, unmeasured default.
  Same result up to float rounding. Gradient accumulation (train.accumulate_steps > 1) is always
  one program: its micro-batches' forward and backward passes alternate."""
  if config.train.accumulate_steps > 1:
    return False
  split = config.train.get('split_backward')
  return jax.default_backend() == 'cpu' if split is None else bool(split)


def jit_train_step(model, tx, config, mesh, make_train_batch, state_sharding=None):
  """The train step `(state, data, batch, rng) -> (state, metrics)`, jit-compiled: one
  program, or forward and backward as two (`split_backward`). The new state keeps
  `state_sharding` (cvjax.sharding.state_sharding; default: replicated)."""
  replicated = NamedSharding(mesh, P())
  state_sharding = replicated if state_sharding is None else state_sharding
  batch_kw = batch_args(model, config, mesh, make_train_batch)
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


def multi_step(step, k):
  """`k` steps of `step` in one program, a `lax.scan` over the batches' leading axis; returns
  the metrics summed over the k steps (as `accumulate` would), so the host dispatches once."""
  def loop(state, data, batches, rng):
    state, metrics = jax.lax.scan(lambda st, b: step(st, data, b, rng), state, batches, length=k)
    return state, {key: jnp.min(v, 0) if key == 'first_nonfinite' else jnp.sum(v, 0)
                   for key, v in metrics.items()}
  return loop


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


def init_state(init, rng, sharding):
  """`init(rng)` built in place, compiled at XLA's lowest optimisation level: it runs once, and
  optimising it made the compile ~4x slower (ResNet-20, LeNet-5; same values up to 1 ulp)."""
  lowered = jax.jit(init, out_shardings=sharding).lower(rng)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})(rng)


def with_ema_weights(state):
  """The state with its moving average in place of the weights, for the eval step (the same
  structure, so the same compiled program)."""
  return state.replace(params=state.ema['params'], model_state=state.ema['model_state'])


def eval_step(state, test, batch, *, model, make_eval_batch, batch_sharding, dtype, crops=1,
              crop_size=None, padding=0, flip=False, translate=0):
  """Metric sums over one test batch (`make_eval_batch` builds its normalised images, labels
  and mask of padding). With `crops=10` the logits are averaged over `transforms.ten_crop` views of
  size `crop_size`, cut from the images zero-padded (after normalisation) by `padding`; with
  `flip`, over the image and its mirror image; with `translate` too, over `tta_logits`' six
  views. Returns the metric sums, and the top-5 classes of each example (best first) with the
  probability of the first."""
  x, labels, mask = make_eval_batch(test, batch, sharding=batch_sharding, dtype=dtype)
  apply = lambda x: model.apply({'params': state.params, **state.model_state}, x, train=False)
  if crops == 1 and flip and translate:
    logits = tta_logits(apply, x, translate)
  elif crops == 1 and flip:
    logits = jnp.mean(jax.lax.map(apply, jnp.stack([x, x[:, :, ::-1]])), axis=0)
  elif crops == 1:
    logits = apply(x)
  else:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    logits = jnp.mean(jax.lax.map(apply, transforms.ten_crop(x, crop_size)), axis=0)
  metrics = classification_metrics(logits, labels, mask)
  probabilities, top5 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)),
                                      min(5, logits.shape[-1]))
  return metrics, (top5, probabilities[:, 0])


def tta_logits(apply, x, translate):
  """airbench94's test-time augmentation (tta_level=2): the mean over the image and its mirror
  image of 1/2 the unshifted view's logits plus 1/4 each of the views shifted by `translate`
  pixels (`transforms.translate_views`)."""
  views = jnp.concatenate([x[None], transforms.translate_views(x, translate)])
  views = jnp.concatenate([views, views[:, :, :, ::-1]])  # [6, B, H, W, C]
  weights = jnp.array([0.5, 0.25, 0.25] * 2, jnp.float32) / 2
  return jnp.tensordot(weights, jax.lax.map(apply, views).astype(jnp.float32), axes=1)


def grad_norms(state, data, batch, rng, **batch_kw):
  """Gradient norm of every layer's kernel, in forward order, and the global norm, on one
  batch (a diagnostic: run every `train.grad_norm_every_steps`, it leaves the state alone)."""
  loss_fn = batch_loss(state, data, batch, rng, **batch_kw)
  grads, _ = jax.grad(loss_fn, has_aux=True)(state.params)
  norms = {'train/grad_norm': optax.global_norm(grads)}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] == 'kernel':
      norms['grad_norm/' + '/'.join(names[:-1])] = jnp.linalg.norm(g)
  return norms
