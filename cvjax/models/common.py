"""Pieces shared by the model families."""

import flax.linen as nn
import jax.numpy as jnp


def scaled_tanh(x):
  """LeCun et al. 1998: f(a) = 1.7159 tanh(2a/3), so that f(+-1) = +-1."""
  return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


ACTIVATIONS = {'relu': nn.relu, 'tanh': nn.tanh, 'sigmoid': nn.sigmoid,
               'scaled_tanh': scaled_tanh}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


# He et al. 2015 ("Delving deep into rectifiers") initialisation, used by the ResNet paper.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
