"""Pieces shared by the model families."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def scaled_tanh(x):
  """LeCun et al. 1998: f(a) = 1.7159 tanh(2a/3), so that f(+-1) = +-1."""
  return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


def gelu(x):
  """The exact (erf) GELU, PyTorch's nn.GELU() default; Flax's nn.gelu defaults to the tanh
  approximation."""
  return nn.gelu(x, approximate=False)


ACTIVATIONS = {'relu': nn.relu, 'tanh': nn.tanh, 'sigmoid': nn.sigmoid,
               'scaled_tanh': scaled_tanh, 'gelu': gelu}


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
