"""cvjax.convolution gives the same values and gradients as lax's own convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cvjax import convolution

DIMS = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv, strides, padding, **kw):
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=DIMS, **kw)))


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME'),        # CIFAR ResNet 3x3
    ((2, 8, 8, 4), (3, 3, 4, 8), (2, 2), 'SAME'),        # stride-2 first block of a stage
    ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), 'VALID'),     # LeNet C1
    ((1, 31, 31, 3), (11, 11, 3, 4), (4, 4), 'VALID'),   # AlexNet conv1 (smaller image)
    ((2, 15, 17, 4), (1, 1, 4, 4), (2, 2), 'SAME'),      # 1x1 projection, odd sizes
    ((2, 9, 9, 4), (3, 3, 4, 5), (2, 1), ((1, 2), (0, 1))),  # asymmetric everything
    ((2, 14, 14, 4), (7, 7, 4, 4), (2, 2), ((3, 3), (3, 3))),  # ImageNet ResNet stem
    ((2, 10, 10, 3), (3, 3, 3, 4), (2, 2), ((0, -1), (1, -2))),  # negative (cropping) padding
])
def test_gradients_match_autodiff(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  want = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, strides, padding), (0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(_loss(convolution.conv_general_dilated, strides, padding),
                                   (0, 1)))(x, w)
  # Same arithmetic in another order: float32 reassociation only.
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_other_convolutions_go_to_lax_unchanged():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)  # two groups
  f = lambda conv: jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS,
                                                     feature_group_count=2) ** 2))(w)
  np.testing.assert_array_equal(f(convolution.conv_general_dilated), f(lax.conv_general_dilated))


def test_gradients_inside_a_scan_match():
  # The case the explicit form exists for: a convolution in a loop body.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 8)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 8)) * 0.2, jnp.float32)

  def loss(conv):
    def body(h, w):
      return jnp.tanh(conv(h, w, (1, 1), 'SAME', dimension_numbers=DIMS)), None
    return lambda ws: jnp.sum(lax.scan(body, x, ws)[0] ** 2)

  want = jax.jit(jax.grad(loss(lax.conv_general_dilated)))(ws)
  got = jax.jit(jax.grad(loss(convolution.conv_general_dilated)))(ws)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_cifar_resnet_convolutions_take_the_explicit_gradients(monkeypatch):
  # Every convolution of the CIFAR ResNet goes through conv2d (stem + 2 per block).
  calls = []
  original = convolution.conv2d

  def spy(*args):
    calls.append(args[2:])
    return original(*args)

  monkeypatch.setattr(convolution, 'conv2d', spy)
  from cvjax.models import CifarResNet  # pylint: disable=g-import-not-at-top
  model = CifarResNet(depth=8)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  jax.grad(lambda p: jnp.sum(model.apply({**variables, 'params': p}, x)))(variables['params'])
  assert len(calls) == 2 * 7  # init and apply, 7 convolutions each
  assert ((2, 2), ((0, 1), (0, 1))) in calls  # the stride-2 first block of a stage
