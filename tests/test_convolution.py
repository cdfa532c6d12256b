"""cvjax.convolution gives the same values and gradients as lax's own convolution, on both
of its CPU paths: oneDNN custom calls (native) and XLA's convolutions (xla)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cvjax import convolution
from cvjax import native_conv

DIMS = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(params=['native', 'xla'])
def backend(request, monkeypatch):
  """Runs a test on each path; `native` must work wherever it can be built."""
  if request.param == 'native':
    require_native()
  monkeypatch.setitem(convolution._NATIVE, 'enabled', request.param == 'native')
  return request.param


def require_native():
  """Skips only where the library cannot be built here (no g++, no oneDNN wheel, not
  Linux x86-64); anywhere else a failed build fails the test."""
  reason = native_conv.unbuildable_reason()
  if reason:
    pytest.skip(f'oneDNN convolutions cannot be built here: {reason}')
  assert native_conv.available(), native_conv._load()[1]


def custom_calls(f, *args):
  """FFI targets in the compiled program of f(*args)."""
  text = jax.jit(f).lower(*args).compile().as_text()
  return {t for t in ('cvjax_CvjaxConvForward', 'cvjax_CvjaxConvBackward') if t in text}


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
    ((2, 9, 9, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),  # stride 2, explicit pad 1
    ((2, 8, 8, 4), (5, 5, 2, 6), (1, 1), 'SAME'),        # AlexNet conv2: two groups
])
def test_gradients_match_autodiff(backend, shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  groups = shape[-1] // kernel[2]
  loss = lambda conv: _loss(conv, strides, padding, feature_group_count=groups)
  want = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1)))(x, w)
  f = jax.value_and_grad(loss(convolution.conv_general_dilated), (0, 1))
  got = jax.jit(f)(x, w)
  # Same arithmetic in another order: float32 reassociation only.
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
  negative = any(p < 0 for pair in padding for p in pair) if not isinstance(padding, str) else 0
  # Which path ran: oneDNN for everything but the cropping padding, which it cannot do.
  native = backend == 'native' and not negative
  assert custom_calls(f, x, w) == (
      {'cvjax_CvjaxConvForward', 'cvjax_CvjaxConvBackward'} if native else set())


def test_other_convolutions_go_to_lax_unchanged(backend):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
  for kw in (dict(rhs_dilation=(2, 2)), dict(batch_group_count=2)):
    wk = w[..., :2] if 'batch_group_count' in kw else w
    f = lambda conv: jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), 'SAME',
                                                       dimension_numbers=DIMS, **kw) ** 2))(wk)
    np.testing.assert_array_equal(f(convolution.conv_general_dilated),
                                  f(lax.conv_general_dilated))
  # bfloat16 is not the oneDNN kernel's: it goes to XLA.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  conv = lambda x, w: convolution.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DIMS)
  assert not custom_calls(conv, xb, wb)


def test_gradients_inside_a_scan_match(backend):
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


def test_donated_jit_matches(backend):
  # Under jit with the input buffers donated (as the train step donates its state).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.2, jnp.float32)

  def step(conv, x, w):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DIMS),
                     x, w)
    dx, dw = vjp(jnp.cos(y))
    return x - 0.1 * dx, w - 0.1 * dw

  want = jax.jit(functools.partial(step, lax.conv_general_dilated))(x, w)
  got = jax.jit(functools.partial(step, convolution.conv_general_dilated),
                donate_argnums=(0, 1))(x.copy(), w.copy())
  for a, b in zip(want, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_weight_gradient_alone_skips_the_input_gradient():
  # The stem's case: its input (the image) is not differentiated, so the backward call is
  # told not to compute the input gradient; the weight gradient is unchanged.
  require_native()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)
  grad = lambda conv: jax.grad(lambda w: jnp.sum(jnp.sin(
      conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS))))
  want = jax.jit(grad(lax.conv_general_dilated))(w)
  np.testing.assert_allclose(jax.jit(grad(convolution.conv_general_dilated))(w), want,
                             rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
  assert 'need_dx = 0' in jax.jit(grad(convolution.conv_general_dilated)).lower(w).as_text()


def test_bad_shapes_raise_instead_of_crashing():
  # Shapes the Python side would never send: the handler answers with an error.
  require_native()
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  call = jax.ffi.ffi_call('cvjax_CvjaxConvForward', jax.ShapeDtypeStruct((2, 5, 5, 4), x.dtype))
  attrs = {k: np.int64(v) for k, v in dict(stride_h=1, stride_w=1, pad_top=1, pad_bottom=1,
                                             pad_left=1, pad_right=1, groups=1).items()}
  with pytest.raises(Exception, match='cvjax onednn conv'):
    jax.block_until_ready(call(x, w, **attrs))  # Output 5x5 for an 8x8 SAME convolution.
  with pytest.raises(Exception, match='cvjax onednn conv'):
    jax.block_until_ready(call(x, w, **{**attrs, 'groups': np.int64(3)}))


@pytest.mark.slow
def test_cifar_resnet_convolutions_take_the_explicit_gradients(monkeypatch):
  # Every convolution of the CIFAR ResNet goes through conv2d (stem + 2 per block).
  monkeypatch.setitem(convolution._NATIVE, 'enabled', False)
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
  assert ((2, 2), ((1, 1), (1, 1))) in calls  # the stride-2 first block of a stage: pad 1


@pytest.mark.slow
def test_train_steps_match_on_both_paths(idx_dir, tmp_path):
  # ResNet-14, 6 SGD steps with BatchNorm, split forward/backward programs: the same
  # parameters and statistics on oneDNN as on XLA's convolutions. Tolerance: float
  # reassociation only. (With model.scan_blocks=True they differed by up to 50%: such
  # models keep XLA's convolutions for now, see train.setup.)
  require_native()
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from cvjax import train  # pylint: disable=g-import-not-at-top
  kw = {'model.depth': 14, 'train.num_steps': 6, 'train.eval_every_steps': 6}
  states = {}
  for native in (True, False):
    config = tiny_config(idx_dir, **kw, **{'train.native_conv': native})
    state, _ = train.train_and_evaluate(config, str(tmp_path / str(native)))
    states[native] = jax.device_get((state.params, state.model_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               states[True], states[False])
