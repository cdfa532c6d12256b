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


def max_pool(x, window):
  """nn.max_pool(x, window, strides=window) ('VALID': rows and columns past the last whole
  window dropped) as a max over a reshape. The same values; its gradient is a compare and a
  select, where XLA:CPU's select_and_scatter (nn.max_pool's gradient) takes 2-3x as long:
  airbench's batch-1024 train step went from 5.5 s to 4.3 s on a 2-core Zen 4. Where a
  window's maximum is tied, the tied elements share its gradient instead of the first taking
  it all (after a ReLU, the tied zeros pass no gradient either way)."""
  *lead, h, w, c = x.shape
  (wh, ww), (oh, ow) = window, (h // window[0], w // window[1])
  x = x[..., :oh * wh, :ow * ww, :].reshape(*lead, oh, wh, ow, ww, c)
  return x.max(axis=(-4, -2))
