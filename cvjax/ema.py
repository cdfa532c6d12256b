"""An exponential moving average of the weights: the parameters and the BatchNorm statistics
(the model's other variable collections), as timm's ModelEmaV2 and torchvision's
ExponentialMovingAverage(use_buffers=True) keep them, evaluated beside the raw weights."""

import jax
import jax.numpy as jnp


def init(params, model_state):
  """The average starts at the initial weights."""
  return {'params': params, 'model_state': model_state}


def decay_at(step, decay, warmup=True):
  """The decay of the update after `step` updates. With `warmup`, min(decay, (1 + step) /
  (10 + step)) (tf.train.ExponentialMovingAverage's num_updates): the average forgets the
  initial weights within tens of steps instead of ~1 / (1 - decay)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update(average, params, model_state, step, decay, warmup=True):
  """decay * average + (1 - decay) * new, leaf by leaf (float leaves; others are copied).
  Decay 0 gives the new weights exactly."""
  d = decay_at(step, decay, warmup)
  new = init(params, model_state)

  def one(a, x):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return x
    return (d * a.astype(jnp.float32) + (1.0 - d) * x.astype(jnp.float32)).astype(a.dtype)
  return jax.tree.map(one, average, new)
