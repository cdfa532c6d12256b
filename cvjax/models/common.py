"""Pieces shared by the model families."""

import flax.linen as nn

ACTIVATIONS = {'relu': nn.relu, 'tanh': nn.tanh, 'sigmoid': nn.sigmoid}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


# He et al. 2015 ("Delving deep into rectifiers") initialisation, used by the ResNet paper.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
