"""LeNet-5 (LeCun et al. 1998) with modern layers."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or BatchNorm.
    act = common.activation_fn(self.activation)
    x = x.astype(self.dtype)
    x = act(nn.Conv(6, (5, 5), padding='VALID', dtype=self.dtype, name='C1')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = act(nn.Conv(16, (5, 5), padding='VALID', dtype=self.dtype, name='C3')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(120, dtype=self.dtype, name='C5')(x))
    x = act(nn.Dense(84, dtype=self.dtype, name='F6')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='output')(x)
    return x.astype(jnp.float32)
