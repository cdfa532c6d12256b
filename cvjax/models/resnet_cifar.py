"""CIFAR ResNets of He et al. 2015, section 4.2, and their plain twins.

Depth 6n+2: a 3x3 conv with 16 filters, three stages of n basic blocks with
16, 32 and 64 filters (the first block of stages 2 and 3 has stride 2), global
average pooling and a dense classifier. Shortcuts are option A: the identity,
with stride-2 subsampling and zero-padded channels where the shape changes,
so they add no parameters and the plain twin (`residual=False`) differs from
the ResNet by the identity additions alone.

The convolutions take their gradients from `cvjax.ops.convolution` (the same numbers as
autodiff, in the form XLA:CPU keeps fast inside `nn.scan` loops).
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvjax.errors import UserError
from cvjax.models import common
from cvjax.ops import convolution


def blocks_per_stage(depth):
  """n of a depth-(6n+2) net; any other depth is a UserError."""
  if depth < 8 or (depth - 2) % 6:
    raise UserError(f'model.depth={depth} is not a CIFAR ResNet depth: it must be 6n+2 with '
                    'n >= 1 (the paper uses 20, 32, 44, 56, 110 and 1202).')
  return (depth - 2) // 6


def shortcut_a(x, filters: int, stride: int):
  """Option A: subsample by `stride` and zero-pad the new channels."""
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = filters - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv-BN-act-conv-BN, plus the shortcut when residual, then act."""
  filters: int
  stride: int
  residual: bool
  conv: Any
  norm: Any
  act: Any
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.stride, self.stride))(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)(y)
    if self.residual:
      y = y + shortcut_a(x, self.filters, self.stride)
    return self.act(y)


class RepeatedBlocks(nn.Module):
  """`length` identical BasicBlocks as one `nn.scan`: XLA compiles the block once, so
  compile time stops growing with depth (ResNet-1202). Parameters are stacked along a
  leading axis of size `length`."""
  length: int
  block: Any  # A BasicBlock class, possibly wrapped in nn.remat.
  kwargs: Any

  @nn.compact
  def __call__(self, x):
    body = lambda module, carry, _: (module(carry), None)
    scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0},
                   split_rngs={'params': True}, length=self.length)
    x, _ = scan(self.block(**dict(self.kwargs), name='block'), x, None)
    return x


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs; `residual=False` gives the plain net."""
  depth: int = 20
  num_classes: int = 10
  residual: bool = True
  activation: str = 'relu'
  batch_norm: bool = True
  bn_momentum: float = 0.9  # Flax convention: PyTorch's momentum=0.1.
  zero_init_residual: bool = False
  scan_blocks: bool = False  # Compile each stage's repeated blocks once (nn.scan).
  remat: bool = False  # Re-compute each block's activations in backward: less memory.
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = blocks_per_stage(self.depth)
    act = common.activation_fn(self.activation)
    # Without BatchNorm the convolutions get biases instead. Every conv is 3x3 and pads 1 on
    # every side, as the paper: 'SAME' would pad a stride-2 conv 0 before and 1 after on
    # even sizes, so the branch would sample pixels 2i+1 and the shortcut 2i.
    conv = functools.partial(nn.Conv, padding=((1, 1), (1, 1)), use_bias=not self.batch_norm,
                             kernel_init=common.he_normal, dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    if self.batch_norm:
      norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                               momentum=self.bn_momentum, epsilon=1e-5, dtype=self.dtype)
    else:
      norm = lambda **kw: (lambda y: y)

    x = x.astype(self.dtype)
    x = act(norm()(conv(16, (3, 3))(x)))
    block_cls = nn.remat(BasicBlock) if self.remat else BasicBlock
    for stage, filters in enumerate((16, 32, 64)):
      kw = dict(filters=filters, residual=self.residual, conv=conv, norm=norm, act=act,
                zero_init_residual=self.zero_init_residual)
      if self.scan_blocks and n > 1:  # Block 1 may change the shape; blocks 2..n repeat.
        x = block_cls(stride=2 if stage else 1, **kw, name=f'stage{stage + 1}_block1')(x)
        x = RepeatedBlocks(n - 1, block_cls, tuple(dict(stride=1, **kw).items()),
                           name=f'stage{stage + 1}_blocks2_{n}')(x)
        continue
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(stride=stride, **kw, name=f'stage{stage + 1}_block{block + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def very_deep(cfg):
  """Where unscanned XLA compilation takes minutes (ResNet-1202): the default for scanning
  blocks and for remat when the config leaves them unset."""
  return cfg.name == 'resnet_cifar' and cfg.depth > 110


def from_config(cfg, **kw):
  """The net of a `model` block of configs/resnet.py's CIFAR recipes."""
  blocks_per_stage(cfg.depth)  # Its check, before the model is built.
  return CifarResNet(depth=cfg.depth, residual=cfg.residual, activation=cfg.activation,
                     batch_norm=cfg.batch_norm, bn_momentum=cfg.bn_momentum,
                     zero_init_residual=cfg.zero_init_residual,
                     scan_blocks=(very_deep(cfg) if cfg.get('scan_blocks') is None  # None: unset.
                                  else cfg.scan_blocks),
                     **kw)
