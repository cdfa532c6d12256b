"""airbench94's net (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024,
arXiv 2404.00498): a frozen 2x2 patch-whitening conv, then three conv groups of widths
64/256/256, each conv-pool-BN-GELU-conv-BN-GELU, a 3x3 max-pool to 1x1, a dense layer without
bias and the logits scaled by 1/9.

The whitening kernel is not a parameter: it lives in `batch_stats` (with a `whiten_ready`
flag) and the first training step computes it from that step's images, as airbench computes
it from 5,000 training images before its first step (`whitening_kernel`). Nothing outside
the model takes part, so the loop, checkpoints and populations treat it as any BatchNorm
statistic. BatchNorm has no scale (airbench freezes it at 1), epsilon 1e-12, and keeps 60% of
its running averages per step (airbench's momentum 0.6 is PyTorch's momentum=0.4, Flax's
momentum=0.6). 3x3 convs have no bias and start as the identity on their first `in`
output channels (Dirac), PyTorch's default uniform init elsewhere.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.ops import convolution

WHITEN_SIZE = 2  # The whitening conv's kernel: 2x2, no padding.

# PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_uniform = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def dirac_init(key, shape, dtype=jnp.float32):
  """torch.nn.init.dirac_ on the first min(in, out) output channels of an HWIO kernel (output
  channel i passes input channel i through its centre tap), PyTorch's default init on the
  rest: airbench's Conv.reset_parameters."""
  kernel = torch_uniform(key, shape, dtype)
  h, w, cin, cout = shape
  n = min(cin, cout)
  eye = jnp.zeros((h, w, cin, n), dtype).at[h // 2, w // 2].set(jnp.eye(cin, n, dtype=dtype))
  return kernel.at[..., :n].set(eye)


def patches(images, size=WHITEN_SIZE):
  """Every size x size patch (stride 1, no padding) of NHWC images, flattened in (h, w, c)
  order: [N * (H - size + 1) * (W - size + 1), size * size * C]."""
  n, h, w, c = images.shape
  views = [images[:, i:h - size + 1 + i, j:w - size + 1 + j] for i in range(size)
           for j in range(size)]
  return jnp.stack(views, axis=3).reshape(-1, size * size * c)


def whitening_kernel(images, eps=5e-4, size=WHITEN_SIZE):
  """The HWIO kernel [size, size, C, 2 * size * size * C] of airbench's whitening conv: the
  eigenvectors of the (uncentred) patch covariance, largest eigenvalue first, each divided by
  sqrt(eigenvalue + eps), then the same filters negated (so GELU after it keeps both signs)."""
  p = patches(images.astype(jnp.float32), size)
  cov = p.T @ p / p.shape[0]
  values, vectors = jnp.linalg.eigh(cov)  # Ascending.
  values, vectors = values[::-1], vectors[:, ::-1]
  scaled = vectors / jnp.sqrt(values + eps)[None, :]  # Columns: filters in (h, w, c) order.
  kernel = scaled.reshape(size, size, images.shape[-1], -1)
  return jnp.concatenate([kernel, -kernel], axis=-1)


class ConvGroup(nn.Module):
  """airbench's ConvGroup: conv, 2x2 max-pool, BN, act, conv, BN, act."""
  width: int
  conv: Any
  norm: Any
  act: Any

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.width)(x)
    x = common.max_pool(x, (2, 2))
    x = self.act(self.norm()(x))
    x = self.conv(self.width)(x)
    return self.act(self.norm()(x))


class Airbench(nn.Module):
  """airbench94's net for 32x32 images. `whiten=False` makes the first conv a trainable 2x2
  conv of the same width (the ablation); `dirac=False` gives every 3x3 conv PyTorch's default
  init."""
  widths: Sequence[int] = (64, 256, 256)
  num_classes: int = 10
  activation: str = 'gelu'
  bn_momentum: float = 0.6  # Flax convention: keeps 60% (PyTorch's momentum=0.4).
  logit_scale: float = 1 / 9
  whiten: bool = True
  whiten_eps: float = 5e-4
  dirac: bool = True
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = common.activation_fn(self.activation)
    c = x.shape[-1]
    width = 2 * WHITEN_SIZE * WHITEN_SIZE * c  # 24 for RGB.
    x = x.astype(self.dtype)
    if self.whiten:
      ready = self.variable('batch_stats', 'whiten_ready', lambda: jnp.zeros((), jnp.int32))
      kernel = self.variable('batch_stats', 'whiten_kernel', lambda: jnp.zeros(
          (WHITEN_SIZE, WHITEN_SIZE, c, width), jnp.float32))
      if train and not self.is_initializing():
        kernel.value = jax.lax.cond(
            ready.value > 0, lambda: kernel.value,
            lambda: whitening_kernel(jax.lax.stop_gradient(x), self.whiten_eps))
        ready.value = jnp.ones((), jnp.int32)
      bias = self.param('whiten_bias', nn.initializers.zeros, (width,), jnp.float32)
      w = jax.lax.stop_gradient(kernel.value).astype(self.dtype)
      x = self.conv_general_dilated(x, w, (1, 1), 'VALID',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = x + bias.astype(self.dtype).reshape(1, 1, 1, -1)
    else:
      x = nn.Conv(width, (WHITEN_SIZE, WHITEN_SIZE), padding='VALID', kernel_init=torch_uniform,
                  dtype=self.dtype, conv_general_dilated=self.conv_general_dilated,
                  name='whiten_conv')(x)
    x = act(x)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding='SAME', use_bias=False,
                             kernel_init=dirac_init if self.dirac else torch_uniform,
                             dtype=self.dtype, conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-12, use_scale=False,
                             dtype=self.dtype)
    for i, width in enumerate(self.widths):
      x = ConvGroup(width, conv, norm, act, name=f'group{i + 1}')(x)
    x = common.max_pool(x, (3, 3))  # 3x3 -> 1x1 (airbench's MaxPool2d(3)).
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, use_bias=False, kernel_init=torch_uniform, dtype=self.dtype,
                 name='head')(x)
    return (x * self.logit_scale).astype(jnp.float32)


def from_config(cfg, **kw):
  """The net of the `model` block of configs/speedrun.py."""
  widths = tuple(cfg.widths)
  if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
    raise UserError(f'model.widths={cfg.widths!r}; expected three positive integers, the '
                    'widths of the conv groups (airbench94: (64, 256, 256)).')
  if not 0 <= cfg.bn_momentum < 1:
    raise UserError(f'model.bn_momentum={cfg.bn_momentum!r}; expected the share of the running '
                    'average kept per step in [0, 1) (Flax convention; airbench94: 0.6).')
  return Airbench(widths=widths, activation=cfg.activation, bn_momentum=cfg.bn_momentum,
                  logit_scale=cfg.logit_scale, whiten=cfg.whiten, dirac=cfg.dirac, **kw)
