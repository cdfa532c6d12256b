"""ImageNet ResNets of He et al. 2015 (Table 1) and their plain twins.

18/34 use basic blocks (two 3x3 convs), 50/101/152 bottleneck blocks (1x1, 3x3, 1x1 with
4x expansion). Where a block changes the shape, the shortcut is a strided 1x1 projection
with BatchNorm (option B). Downsampling is done by the first conv of conv3_1, conv4_1 and
conv5_1 with stride 2, as in the paper (torchvision's "v1.5" moves it to the 3x3 conv; the
parameter count is the same).

The plain twin (`residual=False`) has the same stacked layers and no shortcuts at all, as
the paper's plain nets: without an identity path there is nothing for a projection to
match, so the projection convs are dropped (ResNet-18 plain has 11,515,688 parameters,
173,824 fewer than ResNet-18).

Inputs smaller than 64x64 (CIFAR) get a 3x3 stride-1 stem conv and no stem max pool.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import common

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}


class Block(nn.Module):
  """A basic (bottleneck=False) or bottleneck block; `filters` is the 3x3 width."""
  filters: int
  stride: int
  bottleneck: bool
  residual: bool
  conv: Any
  norm: Any
  act: Any
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    s = (self.stride, self.stride)
    last_norm = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual
                          else nn.initializers.ones)
    if self.bottleneck:
      out = self.filters * 4
      y = self.act(self.norm()(self.conv(self.filters, (1, 1), s)(x)))
      y = self.act(self.norm()(self.conv(self.filters, (3, 3))(y)))
      y = last_norm(self.conv(out, (1, 1))(y))
    else:
      out = self.filters
      y = self.act(self.norm()(self.conv(self.filters, (3, 3), s)(x)))
      y = last_norm(self.conv(self.filters, (3, 3))(y))
    if self.residual:
      shortcut = x
      if x.shape[-1] != out or self.stride != 1:  # Option B: project.
        shortcut = self.conv(out, (1, 1), s, name='projection_conv')(x)
        shortcut = self.norm(name='projection_bn')(shortcut)
      y = y + shortcut
    return self.act(y)


class ResNet(nn.Module):
  depth: int = 50
  num_classes: int = 1000
  residual: bool = True
  activation: str = 'relu'
  bn_momentum: float = 0.9  # Flax convention: PyTorch's momentum=0.1.
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = common.activation_fn(self.activation)
    conv = functools.partial(nn.Conv, padding='SAME', use_bias=False,
                             kernel_init=common.he_normal, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    if x.shape[1] >= 64:
      x = act(norm()(conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1')(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = act(norm()(conv(64, (3, 3), name='conv1')(x)))
    for stage, blocks in enumerate(STAGES[self.depth]):
      for b in range(blocks):
        x = Block(64 * 2 ** stage, 2 if stage > 0 and b == 0 else 1, self.depth >= 50,
                  self.residual, conv, norm, act, self.zero_init_residual,
                  name=f'conv{stage + 2}_{b + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)
