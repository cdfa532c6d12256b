"""Pieces shared by the model families."""

from typing import Any

import flax.linen as nn
from jax import lax
import jax.numpy as jnp
import numpy as np


def scaled_tanh(x):
  """LeCun et al. 1998: f(a) = 1.7159 tanh(2a/3), so that f(+-1) = +-1."""
  return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


ACTIVATIONS = {'relu': nn.relu, 'tanh': nn.tanh, 'sigmoid': nn.sigmoid,
               'scaled_tanh': scaled_tanh}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


# He et al. 2015 ("Delving deep into rectifiers") initialisation, used by the ResNet paper.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def adaptive_avg_pool(x, size):
  """PyTorch's AdaptiveAvgPool2d to `size` = (h, w) on NHWC: output cell i averages input rows
  floor(i * H / h) to ceil((i + 1) * H / h) - 1 (the bins may overlap, or repeat a row when
  H < h). Written as two small averaging matrices, so it is exact and any H, W works."""
  def bins(n, m):
    a = np.zeros((m, n), np.float32)
    for i in range(m):
      lo, hi = (i * n) // m, -(-(i + 1) * n // m)
      a[i, lo:hi] = 1.0 / (hi - lo)
    return jnp.asarray(a, x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', bins(x.shape[1], size[0]), x, bins(x.shape[2], size[1]))


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all axes but the last, with its batch statistics as dot products.

  With XLA:CPU's ynn fusions off, `ones @ x` and `ones @ x*x` beat the mean reductions
  nn.BatchNorm writes (forward and backward of a 128x32x32x16 activation: 17.8 vs 22.3 ms
  here); with XLA's default ynn fusions, which cvjax runs with the oneDNN convolutions,
  nn.BatchNorm is as fast or faster (8.9 vs 10.1 ms), so the models keep nn.BatchNorm.
  Everything else is nn.BatchNorm's: the variables and their names (a module named
  BatchNorm gets nn.BatchNorm's BatchNorm_<i>), the one-pass variance E[x^2] - E[x]^2
  clipped at 0 in float32, the running averages, and the normalisation in the same order,
  so checkpoints of either load in the other (tests/test_models.py).
  """
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32),
                            (features,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32),
                           (features,))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = batch_moments(x)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
    shape = (1,) * (x.ndim - 1) + (features,)
    y = x - mean.reshape(shape)
    y *= (lax.rsqrt(var + self.epsilon) * scale).reshape(shape)
    y += bias.reshape(shape)
    return jnp.asarray(y, self.dtype or jnp.result_type(x, scale, bias))


def batch_moments(x):
  """Mean and (one-pass, clipped) variance over all axes but the last, in float32."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  ones = jnp.ones((x.shape[0],), jnp.float32)
  mean = (ones @ x) / x.shape[0]
  mean2 = (ones @ (x * x)) / x.shape[0]
  return mean, jnp.maximum(0.0, mean2 - mean * mean)
