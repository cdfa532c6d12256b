"""The train state and the steps of one run: the train step (one program, or forward and
backward as two), the eval step and the gradient-norm diagnostic. Pure functions of arrays,
their settings in one `StepOptions` built once from the config; `cvjax/jit_steps.py` compiles
them for a run or a population, `cvjax/train.py` calls them.

The steps never look at the pipeline: `data.Input` hands them `make_train_batch` and
`make_eval_batch`, which build the model's input from whatever the batch argument holds."""

import dataclasses
import functools
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything a train step needs besides arrays, built once from the config
  (`step_options`); frozen and hashable, so it is one static argument."""
  model: Any
  tx: Any  # The optax optimizer.
  make_train_batch: Callable  # The pipeline's: (data, batch, rng, ...) -> (images, labels).
  batch_sharding: Any  # Where the batch's examples live (NamedSharding).
  dtype: Any  # The compute dtype of the images.
  label_smoothing: float = 0.0
  random_erasing: float = 0.0  # data/transforms.random_erase's probability (0: off).
  mixup_alpha: float = 0.0  # data/transforms.mix's settings (both alphas 0: off).
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  cutmix_prob: float = 0.5
  accumulate_steps: int = 1  # Micro-batches per update (`_accumulated_grads`).
  skip_nonfinite: bool = False  # A non-finite update is not applied (`apply_gradients`).
  ema_decay: float = 0.0  # The moving average of the weights (cvjax/ema.py), with a state's `ema`.
  ema_warmup: bool = True


def step_options(config, mesh, make_train_batch, model, tx, batch_sharding=None):
  """The options of `config`'s train step on `mesh`, with the input's `make_train_batch`;
  the batch split over the data axis unless `batch_sharding` says otherwise."""
  i, t = config.input, config.train
  return StepOptions(
      model=model, tx=tx, make_train_batch=make_train_batch,
      batch_sharding=(NamedSharding(mesh, P('data')) if batch_sharding is None
                      else batch_sharding),
      dtype=convolution.compute_dtype(config), label_smoothing=t.label_smoothing,
      random_erasing=i.random_erasing, mixup_alpha=i.mixup_alpha, cutmix_alpha=i.cutmix_alpha,
      mix_prob=i.mix_prob, cutmix_prob=i.cutmix_prob, accumulate_steps=t.accumulate_steps,
      skip_nonfinite=t.skip_nonfinite, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup)


def train_inputs(state, data, batch, rng, opts):
  """(images, targets, dropout rng) of this step: the pipeline's batch (`make_train_batch`),
  then random erasing, Mixup and CutMix (off by default). `targets` holds the `labels`, and for
  a mixed batch what data/transforms.mix returns."""
  # fold_in the step: a resumed run draws the same numbers.
  step_rng = jax.random.fold_in(rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  x, labels = opts.make_train_batch(data, batch, augment_rng, sharding=opts.batch_sharding,
                                    dtype=opts.dtype, step=state.step)
  targets = {'labels': labels}
  # From their own rng, so the papers' crops and flips stay as they were.
  erase_rng, mix_rng = jax.random.split(jax.random.fold_in(step_rng, 1))
  if opts.random_erasing:
    x = transforms.random_erase(x, erase_rng, opts.random_erasing)
  if opts.mixup_alpha or opts.cutmix_alpha:
    x, mixed_labels, weight = transforms.mix(
        x, labels, mix_rng, mixup_alpha=opts.mixup_alpha, cutmix_alpha=opts.cutmix_alpha,
        prob=opts.mix_prob, cutmix_prob=opts.cutmix_prob)
    targets.update(mixed_labels=mixed_labels, weight=weight)
  return x, targets, dropout_rng


def train_step(state, data, batch, rng, opts, forward_only=False):
  """One SGD step on `batch` (whatever the pipeline's `make_train_batch` reads): the batch and
  its augmentation, the loss, its gradient (with `opts.accumulate_steps` > 1 from that many
  micro-batches), the update. `forward_only`: the CPU split's first program
  (`split_backward`), which returns the backward pass for `train_backward` instead."""
  x, targets, dropout_rng = train_inputs(state, data, batch, rng, opts)
  count = x.shape[0]  # The loss is the mean over the whole batch, micro-batches too.

  def loss_fn(params, model_state, x, targets, dropout_rng):
    """The mean loss, with (metrics, new BatchNorm statistics); the train error against the
    unmixed labels."""
    logits, new_vars = opts.model.apply({'params': params, **model_state}, x, train=True,
                                        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
    metrics = classification_metrics(logits, targets['labels'])
    if opts.label_smoothing or 'mixed_labels' in targets:
      metrics['loss'] = losses.train_loss_sum(logits, targets, opts.label_smoothing)
    return metrics['loss'] / count, (metrics, new_vars)

  if forward_only:  # The residuals (saved activations) are arrays: they can leave the program.
    _, backward, (metrics, new_vars) = jax.vjp(
        lambda params: loss_fn(params, state.model_state, x, targets, dropout_rng),
        state.params, has_aux=True)
    return backward, metrics, new_vars
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if opts.accumulate_steps > 1:
    grads, metrics, new_vars = _accumulated_grads(grad_fn, state, x, targets, dropout_rng, opts)
  else:
    grads, (metrics, new_vars) = grad_fn(state.params, state.model_state, x, targets,
                                         dropout_rng)
  return apply_gradients(state, grads, new_vars, metrics, opts)


# The forward half of `train_step`, `(state, data, batch, rng, opts) -> (the backward pass as a
# function whose residuals are arrays, metrics, new BatchNorm statistics)`, for
# `train_backward` in a second program.
train_forward = functools.partial(train_step, forward_only=True)


def train_backward(state, forward, opts):
  """The backward half of `train_step` (`forward`: what `train_forward` returned), and the
  update (never with micro-batches: `split_backward`)."""
  backward, metrics, new_vars = forward
  (grads,) = backward(jnp.ones((), jnp.float32))
  return apply_gradients(state, grads, new_vars, metrics, opts)


def _accumulated_grads(grad_fn, state, x, targets, dropout_rng, opts):
  """Gradient of the mean loss over the batch from `opts.accumulate_steps` micro-batches in
  turn (lax.scan: one micro-batch's activations in memory at a time), summed: the large
  batch's gradient. Without BatchNorm it is the one-step gradient up to float rounding. With
  it, each micro-batch is normalised by its own statistics and updates the running averages in
  turn (accumulate_steps updates a step), as a PyTorch loop of micro-batch backward passes
  does. The batch is built and augmented whole first (Mixup pairs examples across
  micro-batches); micro-batch i takes examples i, i + k, ..., so each device's rows split
  evenly."""
  k = opts.accumulate_steps
  micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1),
                       (x, targets))

  def one(carry, inputs):
    grads, model_state = carry
    (x_i, targets_i), i = inputs
    x_i = jax.lax.with_sharding_constraint(x_i, opts.batch_sharding)
    g, (metrics, new_vars) = grad_fn(state.params, model_state, x_i, targets_i,
                                     jax.random.fold_in(dropout_rng, i))
    return (jax.tree.map(jnp.add, grads, g), {**model_state, **new_vars}), metrics
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, model_state), metrics = jax.lax.scan(one, (zeros, state.model_state),
                                               (micro, jnp.arange(k)))
  return grads, jax.tree.map(lambda m: jnp.sum(m, 0), metrics), model_state


def apply_gradients(state, grads, new_vars, metrics, opts):
  """The update, and two metrics that say whether it was finite: `nonfinite` (0 or 1, a
  count once summed) and `first_nonfinite` (this step, or int32 max; a min once combined).
  With `opts.skip_nonfinite`, a non-finite update is not applied (only the step advances).
  A state with an `ema` moves it towards the new weights by `opts.ema_decay` (cvjax/ema.py)."""
  updates, opt_state = opts.tx.update(grads, state.opt_state, state.params)
  new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      model_state={**state.model_state, **new_vars}, opt_state=opt_state)
  if state.ema is not None:
    new = new.replace(ema=ema_lib.update(state.ema, new.params, new.model_state, state.step,
                                         opts.ema_decay, opts.ema_warmup))
  finite = (jnp.isfinite(metrics['loss']) & checkpointing.all_finite(grads) &
            checkpointing.all_finite(new))
  if opts.skip_nonfinite:
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


def grad_norms(state, data, batch, rng, opts):
  """Gradient norm of every layer's kernel, in forward order, and the global norm, on one
  batch (a diagnostic: run every `train.grad_norm_every_steps`, it leaves the state alone)."""
  backward, _, _ = train_forward(state, data, batch, rng, opts)
  (grads,) = backward(jnp.ones((), jnp.float32))
  norms = {'train/grad_norm': optax.global_norm(grads)}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] == 'kernel':
      norms['grad_norm/' + '/'.join(names[:-1])] = jnp.linalg.norm(g)
  return norms
