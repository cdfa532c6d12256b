"""AlexNet (Krizhevsky, Sutskever & Hinton 2012)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.ops import convolution


def local_response_norm(x, k=2.0, n=5, alpha=1e-4, beta=0.75):
  """b = a / (k + alpha * sum of a^2 over n neighbouring channels)^beta (section 3.3).

  alpha multiplies the plain sum, as in the paper (Caffe divides it by n).
  """
  sq = jax.lax.reduce_window(x * x, 0.0, jax.lax.add, (1, 1, 1, n), (1, 1, 1, 1),
                             ((0, 0), (0, 0), (0, 0), (n // 2, (n - 1) // 2)))
  return x / (k + alpha * sq) ** beta


class AlexNet(nn.Module):
  """5 conv (96-256-384-384-256), 3 overlapping 3x3/2 max pools, 3 dense (4096-4096-classes).

  `groups=2` is the paper's two-tower split (conv2, conv4, conv5 see half the channels):
  60,965,224 parameters at 227x227x3 -> 1000; `groups=1` is the one-tower net (62,378,344).
  Inputs smaller than 64x64 (CIFAR) get a 3x3 stride-1 first conv instead of 11x11 stride 4,
  so that 32x32 images keep 3x3 maps after the three pools; the rest is unchanged.

  `variant='torchvision'` is torchvision's AlexNet (after Krizhevsky's "one weird trick"
  paper, 2014), whose published weights `cvjax.import_weights` reads: one tower of
  64-192-384-256-256 channels, conv1 11x11/4 with padding 2, no LRN, and an adaptive average
  pool to 6x6 before fc6, so any input of at least 63x63 works (61,100,840 parameters).
  """
  num_classes: int = 1000
  variant: str = 'paper'  # paper | torchvision.
  groups: int = 2
  activation: str = 'relu'
  dropout_rate: float = 0.5
  width: float = 1.0  # Multiplies every layer's features (1: the paper's; tests use less).
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = common.activation_fn(self.activation)
    conv = lambda f, k, s=1, p='SAME', g=1, name=None: nn.Conv(
        int(f * self.width), (k, k), (s, s), padding=p, feature_group_count=g, dtype=self.dtype,
        conv_general_dilated=self.conv_general_dilated, name=name)
    pool = lambda y: nn.max_pool(y, (3, 3), strides=(2, 2))
    x = x.astype(self.dtype)
    if self.variant == 'torchvision':
      x = pool(act(conv(64, 11, 4, ((2, 2), (2, 2)), name='conv1')(x)))
      x = pool(act(conv(192, 5, name='conv2')(x)))
      x = act(conv(384, 3, name='conv3')(x))
      x = act(conv(256, 3, name='conv4')(x))
      x = pool(act(conv(256, 3, name='conv5')(x)))
      x = common.adaptive_avg_pool(x, (6, 6))
    else:
      if x.shape[1] >= 64:
        x = act(conv(96, 11, 4, 'VALID', name='conv1')(x))
      else:
        x = act(conv(96, 3, name='conv1')(x))
      x = pool(local_response_norm(x))
      x = pool(local_response_norm(act(conv(256, 5, g=self.groups, name='conv2')(x))))
      x = act(conv(384, 3, name='conv3')(x))
      x = act(conv(384, 3, g=self.groups, name='conv4')(x))
      x = pool(act(conv(256, 3, g=self.groups, name='conv5')(x)))
    x = x.reshape((x.shape[0], -1))
    for i in (6, 7):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = act(nn.Dense(int(4096 * self.width), dtype=self.dtype, name=f'fc{i}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc8')(x)
    return x.astype(jnp.float32)


def from_config(cfg, **kw):
  """The net of a `model` block of configs/alexnet.py."""
  variant = cfg.get('variant', AlexNet.variant)  # Absent: the paper's.
  if variant not in ('paper', 'torchvision'):
    raise UserError(f'unknown model.variant={variant!r} for alexnet; expected paper or '
                    'torchvision.')
  if cfg.groups not in (1, 2):
    raise UserError(f'model.groups={cfg.groups}: AlexNet has 1 (one tower) or 2 (the paper).')
  if variant == 'torchvision' and cfg.groups != 1:
    raise UserError('model.variant=torchvision is a one-tower net: set model.groups=1 '
                    '(configs/alexnet.py:imagenet_torchvision does).')
  return AlexNet(variant=variant, groups=cfg.groups, activation=cfg.activation,
                 dropout_rate=cfg.dropout_rate, **kw)
