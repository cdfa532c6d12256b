"""LeNet-5 (LeCun et al. 1998) with modern layers."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvjax.errors import UserError
from cvjax.ops import convolution
from cvjax.models import common


class LeNet5(nn.Module):
  """LeNet-5 on 32x32 inputs: C1 6@5x5, S2, C3 16@5x5, S4, C5 120, F6 84, 10.

  Subsampling is 2x2 average pooling; C3 is fully connected to S2 (the paper's
  partial connection table is the `paper` variant); the output is a dense
  layer of logits instead of RBF units. 61,706 parameters for 10 classes.
  """
  num_classes: int = 10
  activation: str = 'tanh'
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or BatchNorm.
    act = common.activation_fn(self.activation)
    x = x.astype(self.dtype)
    conv = functools.partial(nn.Conv, padding='VALID', dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    x = act(conv(6, (5, 5), name='C1')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = act(conv(16, (5, 5), name='C3')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(120, dtype=self.dtype, name='C5')(x))
    x = act(nn.Dense(84, dtype=self.dtype, name='F6')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='output')(x)
    return x.astype(jnp.float32)


# LeCun et al. 1998, Table I: which S2 maps feed each of the 16 C3 maps. Maps 0-5 see 3
# contiguous S2 maps, 6-11 see 4 contiguous, 12-14 see 4 discontinuous, 15 sees all 6.
C3_TABLE = ([[i, (i + 1) % 6, (i + 2) % 6] for i in range(6)]
            + [[i, (i + 1) % 6, (i + 2) % 6, (i + 3) % 6] for i in range(6)]
            + [[i, (i + 1) % 6, (i + 3) % 6, (i + 4) % 6] for i in range(3)]
            + [list(range(6))])


def c3_connections():
  """Boolean [6, 16]: True where S2 map i feeds C3 map j."""
  table = np.zeros((6, 16), bool)
  for j, inputs in enumerate(C3_TABLE):
    table[inputs, j] = True
  return table


def rbf_codes(num_classes=10, dim=84, seed=1998):
  """Fixed +-1 target codes for the RBF output units, one row per class.

  The paper draws its 7x12 codes as stylised bitmaps of the characters; these are
  pseudo-random +-1 codes of the same size and value range (a fixed seed, not trained).
  """
  return np.where(np.random.default_rng(seed).random((num_classes, dim)) < 0.5, -1.0, 1.0)


class Subsampling(nn.Module):
  """S2/S4: the sum of each 2x2 window times a trainable coefficient, plus a bias, per map."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    coef = self.param('coefficient', nn.initializers.constant(0.25), (x.shape[-1],))
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    s = nn.avg_pool(x, (2, 2), strides=(2, 2)) * 4
    return s * coef.astype(self.dtype).reshape(1, 1, 1, -1) + bias.astype(self.dtype).reshape(
        1, 1, 1, -1)


class PartialConv(nn.Module):
  """C3: a 5x5 convolution whose kernel exists only where `connections` is True.

  The 60 connected (input, output) pairs hold 60 x 25 weights, scattered into a full
  kernel, so the parameter count is the paper's 1,516.
  """
  connections: Any  # Boolean [in, out].
  kernel_size: int = 5
  dtype: Any = jnp.float32
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    conn = np.asarray(self.connections)
    ins, outs = np.nonzero(conn)
    k = self.kernel_size
    fan_in = (conn.sum(axis=0)[outs] * k * k)[None, None, :]  # Fan-in of each output map.
    init = lambda key, shape: jax.random.uniform(key, shape, minval=-1, maxval=1) * (
        2.4 / fan_in)  # The paper's U(-2.4/F, 2.4/F).
    w = self.param('kernel', init, (k, k, len(ins)))
    b = self.param('bias', nn.initializers.zeros, (conn.shape[1],))
    kernel = jnp.zeros((k, k, *conn.shape), w.dtype).at[:, :, ins, outs].set(w)
    y = self.conv_general_dilated(x, kernel.astype(self.dtype), (1, 1), 'VALID',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + b.astype(self.dtype).reshape(1, 1, 1, -1)


class LeNet5Paper(nn.Module):
  """LeNet-5 as published: C3 partial connections, trainable subsampling, the scaled
  tanh 1.7159 tanh(2x/3), and Euclidean RBF outputs to fixed codes.

  Returns logits = -(squared distance to each class code), so softmax cross-entropy on
  them is the paper's MAP criterion (eq. 9) without its constant e^-j competitor class.
  60,000 trainable parameters; the 840 RBF code values live in the 'constants' collection.
  """
  num_classes: int = 10
  activation: str = 'scaled_tanh'
  dtype: Any = jnp.float32
  # The convolution every conv layer calls (cvjax.ops.convolution.for_config decides it).
  conv_general_dilated: Any = convolution.conv_general_dilated

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    act = common.activation_fn(self.activation)
    x = x.astype(self.dtype)
    conv = functools.partial(nn.Conv, padding='VALID', dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    x = act(conv(6, (5, 5), name='C1')(x))
    x = act(Subsampling(self.dtype, name='S2')(x))
    x = act(PartialConv(c3_connections(), dtype=self.dtype,
                        conv_general_dilated=self.conv_general_dilated, name='C3')(x))
    x = act(Subsampling(self.dtype, name='S4')(x))
    x = act(conv(120, (5, 5), name='C5')(x))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(84, dtype=self.dtype, name='F6')(x)).astype(jnp.float32)
    # A variable outside 'params': saved with the model, never trained.
    codes = self.variable('constants', 'rbf_codes',
                          lambda: jnp.asarray(rbf_codes(self.num_classes, 84), jnp.float32)).value
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one matmul.
    sq_dist = (jnp.sum(x * x, -1, keepdims=True) - 2 * x @ codes.T
               + jnp.sum(codes * codes, -1)[None, :])
    return -sq_dist


def from_config(cfg, **kw):
  """The net of a `model` block of configs/lenet.py (`variant`: modern | paper)."""
  variant = cfg.get('variant', 'modern')
  if variant not in ('modern', 'paper'):
    raise UserError(f'unknown model.variant={variant!r} for lenet5; expected modern or paper.')
  return (LeNet5Paper if variant == 'paper' else LeNet5)(activation=cfg.activation, **kw)
