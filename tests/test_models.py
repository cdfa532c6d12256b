import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from cvjax import models
from cvjax.errors import UserError
from cvjax.models.lenet import LeNet5
from cvjax.models.resnet_cifar import CifarResNet


def count_params(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


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
def test_cifar_resnet_params_match_paper_and_plain_twin(depth):
  resnet = count_params(CifarResNet(depth=depth), (1, 32, 32, 3))
  plain = count_params(CifarResNet(depth=depth, residual=False), (1, 32, 32, 3))
  assert plain == resnet
  paper = PAPER_PARAMS[depth]
  digits = 2 if paper < 1 else 1
  assert round(resnet / 1e6, digits) == paper, resnet


@pytest.mark.parametrize('residual', [True, False])
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


def test_residual_and_plain_differ_only_by_the_shortcut():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = CifarResNet(depth=8).init(jax.random.key(0), x)
  res = CifarResNet(depth=8).apply(variables, x)
  plain = CifarResNet(depth=8, residual=False).apply(variables, x)
  assert res.shape == plain.shape
  assert not np.allclose(res, plain)


def test_init_is_deterministic_given_the_seed():
  model = CifarResNet(depth=8)
  x = jnp.zeros((1, 8, 8, 3))
  a = model.init(jax.random.key(3), x)
  b = model.init(jax.random.key(3), x)
  c = model.init(jax.random.key(4), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, a['params'], c['params']))


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
