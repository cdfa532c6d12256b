"""VGG configurations A, B, D, E (VGG-11/13/16/19) of Simonyan & Zisserman 2014."""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.ops import convolution

# Filters of the 3x3 convs per stage; a 2x2 max pool ends each stage (Table 1).
CONFIGS = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # A
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # B
    16: ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),  # D
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),  # E
}


class VGG(nn.Module):
  """Stacks of 3x3 convs, five max pools, dense 4096-4096-classes with dropout 0.5.

  At 224x224 the last pool leaves 7x7x512; at 32x32 (CIFAR) it leaves 1x1x512 and the
  classifier is otherwise unchanged. `batch_norm=True` adds BatchNorm after every conv
  (the later "VGG-BN" variant, not in the paper).
  """
  depth: int = 16
  num_classes: int = 1000
  batch_norm: bool = False
  activation: str = 'relu'
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  width: float = 1.0  # Multiplies every layer's features (1: the paper's; tests use less).
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = common.activation_fn(self.activation)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    for stage, filters in enumerate(CONFIGS[self.depth]):
      for i, f in enumerate(filters):
        x = nn.Conv(int(f * self.width), (3, 3), padding='SAME', use_bias=not self.batch_norm, dtype=self.dtype,
                    conv_general_dilated=self.conv_general_dilated,
                    name=f'conv{stage + 1}_{i + 1}')(x)
        x = act(norm()(x) if self.batch_norm else x)
      x = common.max_pool(x, (2, 2))
    x = x.reshape((x.shape[0], -1))
    # The classifier starts from N(0, 0.01), as torchvision's VGG: with Flax's default
    # (LeCun normal) the 4096-wide layers made the first SGD steps at lr 0.05 blow the loss
    # up (2.3 -> 10.2 in 5 steps of configs/vgg.py:cifar10_vgg16; 2.3 -> 1.98 in 30 with this).
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.01))
    for i in (6, 7):
      x = act(dense(int(4096 * self.width), name=f'fc{i}')(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(self.num_classes, name='fc8')(x)
    return x.astype(jnp.float32)


def from_config(cfg, **kw):
  """The net of a `model` block of configs/vgg.py."""
  if cfg.depth not in CONFIGS:
    raise UserError(f'model.depth={cfg.depth} is not a VGG depth; expected one of '
                    f'{sorted(CONFIGS)} (configurations A, B, D, E).')
  return VGG(depth=cfg.depth, batch_norm=cfg.batch_norm, activation=cfg.activation,
             dropout_rate=cfg.dropout_rate, bn_momentum=cfg.bn_momentum, **kw)
