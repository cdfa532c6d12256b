"""The training loss beyond the papers' cross-entropy: label smoothing (Szegedy et al. 2016)
and the soft targets of Mixup and CutMix, computed from integer labels without building the
one-hot targets."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels, smoothing=0.0):
  """Per example, -sum_k y_k log softmax(logits)_k with y the one-hot label smoothed as
  optax.smooth_labels does it: (1 - smoothing) * one_hot + smoothing / num_classes."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  if not smoothing:
    return nll
  return (1.0 - smoothing) * nll - smoothing * jnp.mean(log_p, axis=-1)


def train_loss_sum(logits, targets, smoothing=0.0):
  """The summed training loss of a batch: `targets` holds the integer `labels` and, for a
  mixed batch, the `mixed_labels` mixed in with weight 1 - `weight` (data/transforms.mix)."""
  loss = cross_entropy(logits, targets['labels'], smoothing)
  if 'mixed_labels' in targets:
    weight = targets['weight']
    loss = weight * loss + (1.0 - weight) * cross_entropy(logits, targets['mixed_labels'],
                                                          smoothing)
  return jnp.sum(loss)
