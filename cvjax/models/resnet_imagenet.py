"""ImageNet ResNets of He et al. 2015 (Table 1) and their plain twins.

18/34 use basic blocks (two 3x3 convs), 50/101/152 bottleneck blocks (1x1, 3x3, 1x1 with
4x expansion). Where a block changes the shape, the shortcut is a strided 1x1 projection
with BatchNorm (option B). Downsampling is done by the first conv of conv3_1, conv4_1 and
conv5_1 with stride 2, as in the paper; `stride_in_bottleneck='3x3'` moves it to the 3x3
conv of the bottleneck ("v1.5", as torchvision and most public checkpoints; the same
parameters, more FLOPs: the 3x3 conv runs at the higher resolution). Basic blocks are the
same in both.

Every k x k conv pads k//2 on every side, as the paper and torchvision: `'SAME'` would pad a
stride-2 3x3 conv 0 before and 1 after on even sizes, so the branch would sample pixels 2i+1
while the strided 1x1 projection samples 2i.

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

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.ops import convolution

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}


def conv_layer(features, kernel_size, strides=(1, 1), **kw):
  """A bias-free conv that pads k//2 on every side (see above), He-normal initialised."""
  return nn.Conv(features, kernel_size, strides, use_bias=False,
                 padding=[(k // 2, k // 2) for k in kernel_size],
                 kernel_init=common.he_normal, **kw)


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
  stride_in_bottleneck: str = '1x1'  # '1x1': the paper (v1); '3x3': torchvision (v1.5).

  @nn.compact
  def __call__(self, x):
    s = (self.stride, self.stride)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    # Layer names follow torchvision's (conv1, bn1, ...), which cvjax.import_weights maps.
    if self.bottleneck:
      out = self.filters * 4
      s1, s3 = (s, (1, 1)) if self.stride_in_bottleneck == '1x1' else ((1, 1), s)
      y = self.act(self.norm(name='bn1')(self.conv(self.filters, (1, 1), s1, name='conv1')(x)))
      y = self.act(self.norm(name='bn2')(self.conv(self.filters, (3, 3), s3, name='conv2')(y)))
      y = self.norm(scale_init=last_scale, name='bn3')(self.conv(out, (1, 1), name='conv3')(y))
    else:
      out = self.filters
      y = self.act(self.norm(name='bn1')(self.conv(self.filters, (3, 3), s, name='conv1')(x)))
      y = self.norm(scale_init=last_scale, name='bn2')(
          self.conv(self.filters, (3, 3), name='conv2')(y))
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
  stride_in_bottleneck: str = '1x1'
  width: int = 64  # Filters of the stem and the first stage (the paper's 64; tests use fewer).
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = common.activation_fn(self.activation)
    conv = functools.partial(conv_layer, dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    if x.shape[1] >= 64:
      x = act(norm(name='bn1')(conv(self.width, (7, 7), (2, 2), name='conv1')(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = act(norm(name='bn1')(conv(self.width, (3, 3), name='conv1')(x)))
    for stage, blocks in enumerate(STAGES[self.depth]):
      for b in range(blocks):
        x = Block(self.width * 2 ** stage, 2 if stage > 0 and b == 0 else 1, self.depth >= 50,
                  self.residual, conv, norm, act, self.zero_init_residual,
                  self.stride_in_bottleneck, name=f'conv{stage + 2}_{b + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


def from_config(cfg, **kw):
  """The net of a `model` block of configs/resnet.py's ImageNet recipes."""
  if cfg.depth not in STAGES:
    raise UserError(f'model.depth={cfg.depth} is not an ImageNet ResNet depth; expected one of '
                    f'{sorted(STAGES)}.')
  stride = cfg.get('stride_in_bottleneck', ResNet.stride_in_bottleneck)  # Absent: the paper's.
  if stride not in ('1x1', '3x3'):
    raise UserError(f'model.stride_in_bottleneck={stride!r}; expected 1x1 (the paper, v1) or '
                    '3x3 (torchvision, v1.5).')
  return ResNet(depth=cfg.depth, residual=cfg.residual, activation=cfg.activation,
                bn_momentum=cfg.bn_momentum, zero_init_residual=cfg.zero_init_residual,
                stride_in_bottleneck=stride, **kw)
