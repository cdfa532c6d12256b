import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from cvjax import models
from cvjax.errors import UserError
from cvjax.models import common, resnet_cifar, resnet_imagenet
from cvjax.models.lenet import LeNet5
from cvjax.models.resnet_cifar import CifarResNet


def count_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


@pytest.mark.slow
def test_lenet5_shape_and_count():
  model = LeNet5()
  x = jnp.zeros((3, 32, 32, 1))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (3, 10)
  # C1 156 + C3 2,416 + C5 48,120 + F6 10,164 + output 850.
  assert count_params(model, (1, 32, 32, 1)) == 61_706


# He et al. 2015, Table 6, stated to the paper's precision (millions).
PAPER_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize('depth', sorted(PAPER_PARAMS))
@pytest.mark.slow
def test_cifar_resnet_params_match_paper_and_plain_twin(depth):
  resnet = count_params(CifarResNet(depth=depth), (1, 32, 32, 3))
  plain = count_params(CifarResNet(depth=depth, residual=False), (1, 32, 32, 3))
  assert plain == resnet
  paper = PAPER_PARAMS[depth]
  digits = 2 if paper < 1 else 1
  assert round(resnet / 1e6, digits) == paper, resnet


@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.slow
def test_cifar_resnet_forward_train_and_eval(residual):
  model = CifarResNet(depth=8, residual=residual, num_classes=7)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (4, 7)
  # Train mode updates the running statistics; eval mode uses them.
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates['batch_stats'],
                                       variables['batch_stats']))
  assert model.apply(variables, x).shape == (4, 7)


@pytest.mark.slow
def test_residual_and_plain_differ_only_by_the_shortcut():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = CifarResNet(depth=8).init(jax.random.key(0), x)
  res = CifarResNet(depth=8).apply(variables, x)
  plain = CifarResNet(depth=8, residual=False).apply(variables, x)
  assert res.shape == plain.shape
  assert not np.allclose(res, plain)


@pytest.mark.slow
def test_init_is_deterministic_given_the_seed():
  model = CifarResNet(depth=8)
  x = jnp.zeros((1, 8, 8, 3))
  a = model.init(jax.random.key(3), x)
  b = model.init(jax.random.key(3), x)
  c = model.init(jax.random.key(4), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, a['params'], c['params']))


@pytest.mark.slow
def test_activation_and_batch_norm_options():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  for act in ('relu', 'tanh', 'sigmoid'):
    model = CifarResNet(depth=8, activation=act, batch_norm=False)
    variables = model.init(jax.random.key(0), x)
    assert 'batch_stats' not in variables
    assert np.isfinite(model.apply(variables, x)).all()


def _model_cfg(**kw):
  return ConfigDict(dict(name='resnet_cifar', depth=20, residual=True, activation='relu',
                         batch_norm=True, bn_momentum=0.9, zero_init_residual=False, **kw))


@pytest.mark.parametrize('depth', [19, 21, 2, 0])
def test_invalid_depth_is_a_user_error(depth):
  cfg = _model_cfg()
  cfg.depth = depth
  with pytest.raises(UserError, match='6n\\+2'):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)


def test_unknown_activation_and_model_are_user_errors():
  cfg = _model_cfg()
  cfg.activation = 'swish'
  with pytest.raises(UserError, match="'relu', 'scaled_tanh', 'sigmoid', 'tanh'"):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)
  cfg = _model_cfg()
  cfg.name = 'resnet_cifra'
  with pytest.raises(UserError, match='lenet5'):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)


def _to_scan_layout(variables, n):
  """Stacks blocks 2..n of each stage the way `scan_blocks=True` lays them out."""
  out = {}
  for col, tree in variables.items():
    tree = dict(tree)
    for stage in (1, 2, 3):
      blocks = [tree.pop(f'stage{stage}_block{b}') for b in range(2, n + 1)]
      tree[f'stage{stage}_blocks2_{n}'] = {'block': jax.tree.map(lambda *x: jnp.stack(x), *blocks)}
    out[col] = tree
  return out


@pytest.mark.slow
def test_scanned_blocks_and_remat_compute_the_same_function():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  model = CifarResNet(depth=20)
  variables = model.init(jax.random.key(0), x)

  def loss_and_grads(m, v):
    def f(p):
      out, _ = m.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out ** 2)
    return jax.value_and_grad(f)(v['params'])

  loss, grads = loss_and_grads(model, variables)
  scan_vars = _to_scan_layout(variables, 3)
  for m, v, g_layout in ((CifarResNet(depth=20, scan_blocks=True), scan_vars, _to_scan_layout),
                         (CifarResNet(depth=20, remat=True), variables, None),
                         (CifarResNet(depth=20, scan_blocks=True, remat=True), scan_vars,
                          _to_scan_layout)):
    other_loss, other_grads = loss_and_grads(m, v)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    expected = g_layout({'params': grads}, 3)['params'] if g_layout else grads
    # Float reassociation only: gradients here are O(1-20).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 other_grads, expected)
  assert count_params(CifarResNet(depth=20, scan_blocks=True), (1, 8, 8, 3)) == 269_722


def identity_like(variables):
  """Every conv kernel an identity: centre tap, input channel c -> output channel c."""
  def kernel(path, x):
    if jax.tree_util.keystr(path[-1:]) != "['kernel']" or x.ndim != 4:
      return x
    k = np.zeros(x.shape, np.float32)
    c = np.arange(min(x.shape[2:]))
    k[x.shape[0] // 2, x.shape[1] // 2, c, c] = 1.0
    return jnp.asarray(k)
  return {**variables, 'params': jax.tree_util.tree_map_with_path(kernel, variables['params'])}


def intermediates(model, variables, x):
  _, state = jax.jit(lambda v: model.apply(v, x, capture_intermediates=True,
                                           mutable=['intermediates']))(variables)
  return state['intermediates']


def test_cifar_stride_two_branch_samples_the_shortcuts_pixels():
  """With identity kernels, the stride-2 block's branch must equal the option-A shortcut's
  subsampling x[::2, ::2]: with 'SAME' padding it takes x[1::2, 1::2] instead."""
  model = CifarResNet(depth=8, residual=False, batch_norm=False)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))  # >= 0: ReLU is the identity.
  variables = identity_like(jax.jit(model.init)(jax.random.key(0), x))
  out = intermediates(model, variables, x)
  block_in = out['stage1_block1']['__call__'][0]
  branch = out['stage2_block1']['__call__'][0]
  assert branch.shape == (2, 8, 8, 32)
  expected = resnet_cifar.shortcut_a(block_in, block_in.shape[-1], 2)
  np.testing.assert_allclose(branch[..., :16], expected, atol=1e-6)
  assert np.abs(expected).min() < np.abs(expected).max()  # Not a constant image.


@pytest.mark.parametrize('bottleneck,stride_in_bottleneck',
                         [(False, '1x1'), (True, '1x1'), (True, '3x3')])
@pytest.mark.slow
def test_imagenet_stride_two_branch_and_projection_sample_the_same_pixels(bottleneck,
                                                                         stride_in_bottleneck):
  """With identity kernels and BatchNorm at its initial statistics, the branch of a stride-2
  block and its strided 1x1 projection must see the same input pixels (2i, 2j)."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
  block = resnet_imagenet.Block(32, 2, bottleneck, True, resnet_imagenet.conv_layer, norm,
                                lambda y: y, stride_in_bottleneck=stride_in_bottleneck)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 64))
  variables = identity_like(jax.jit(block.init)(jax.random.key(0), x))
  out = intermediates(block, variables, x)
  branch = out['bn3' if bottleneck else 'bn2']['__call__'][0]
  projection = out['projection_bn']['__call__'][0]
  assert branch.shape == projection.shape == (1, 8, 8, 128 if bottleneck else 32)
  # BatchNorm at mean 0, variance 1 scales by 1/sqrt(1 + 1e-5) once per layer.
  np.testing.assert_allclose(branch[..., :32], projection[..., :32], rtol=1e-4)
  assert np.abs(projection[..., :32]).min() < np.abs(projection[..., :32]).max()


def test_v1_5_moves_the_stride_to_the_3x3_conv():
  x = jnp.zeros((1, 64, 64, 3))
  shapes = {}
  for stride in ('1x1', '3x3'):
    model = resnet_imagenet.ResNet(depth=50, stride_in_bottleneck=stride)
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v, m=model: intermediates(m, v, x), variables)['conv3_1']
    shapes[stride] = (out['bn1']['__call__'][0].shape, out['bn2']['__call__'][0].shape)
  assert shapes['1x1'] == ((1, 8, 8, 128), (1, 8, 8, 128))
  assert shapes['3x3'] == ((1, 16, 16, 128), (1, 8, 8, 128))
  cfg = ConfigDict(dict(name='resnet', depth=50, residual=True, activation='relu',
                        bn_momentum=0.9, zero_init_residual=False, stride_in_bottleneck='2x2'))
  with pytest.raises(UserError, match='stride_in_bottleneck'):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)


@pytest.mark.parametrize('size,out', [((6, 6), (6, 6)), ((13, 9), (6, 6)), ((1, 1), (6, 6)),
                                      ((7, 7), (7, 7)), ((3, 5), (7, 7))])
def test_adaptive_avg_pool_matches_pytorch(size, out):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, *size, 4)).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), out).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(common.adaptive_avg_pool(jnp.asarray(x), out), expected,
                             rtol=1e-5, atol=1e-6)


def test_alexnet_variants():
  cfg = ConfigDict(dict(name='alexnet', variant='torchvision', groups=2, activation='relu',
                        dropout_rate=0.5))
  with pytest.raises(UserError, match='groups=1'):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)
  cfg.groups = 1
  model = models.create_model(cfg, num_classes=10, dtype=jnp.float32)
  for size in (63, 224):  # The adaptive pool takes any map to 6x6.
    variables = jax.eval_shape(lambda s=size: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))
    assert variables['params']['fc6']['kernel'].shape == (6 * 6 * 256, 4096)
  cfg.variant = 'caffe'
  with pytest.raises(UserError, match='paper or torchvision'):
    models.create_model(cfg, num_classes=10, dtype=jnp.float32)


def test_max_pool_has_nn_max_pools_values_and_gradient():
  """Non-overlapping windows, odd sizes cropped, a leading population axis; random inputs
  (no ties), so the gradient is select_and_scatter's exactly."""
  for shape, window in (((2, 7, 9, 3), (2, 2)), ((3, 3, 3, 4), (3, 3)), ((2, 3, 6, 6, 2), (2, 3))):
    x = jax.random.normal(jax.random.key(0), shape)
    ours = lambda x, window=window: common.max_pool(x, window)
    flax_pool = lambda x, window=window: nn.max_pool(
        x.reshape(-1, *x.shape[-3:]), window, window).reshape(*x.shape[:-3], *ours(x).shape[-3:])
    np.testing.assert_array_equal(ours(x), flax_pool(x))
    grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
    np.testing.assert_array_equal(grad(ours), grad(flax_pool))
