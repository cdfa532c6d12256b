"""The classic model zoo: exact parameter counts, shapes, a training step per family."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvjax import models
from cvjax.models import lenet
from cvjax.ops import convolution
from cvjax.ops import onednn
from cvjax.tools import summary

# Exact counts of the published architectures (227/224 inputs, 1000 classes).
EXACT = {
    'lenet5_paper': 60_000, 'alexnet': 60_965_224, 'alexnet_1tower': 62_378_344,
    'alexnet_torchvision': 61_100_840, 'resnet50_v1.5': 25_557_032,
    'vgg11': 132_863_336, 'vgg13': 133_047_848, 'vgg16': 138_357_544, 'vgg19': 143_667_240,
    'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808,
}


def abstract_variables(name):
  cfg, shape, classes, _, _ = summary.ZOO[name]
  model = models.create_model(cfg, num_classes=classes, dtype=jnp.float32)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))


@pytest.mark.parametrize('name', sorted(EXACT))
@pytest.mark.slow
def test_exact_parameter_counts(name):
  _, variables = abstract_variables(name)
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == EXACT[name]


def test_lenet5_paper_layers_and_fixed_codes():
  _, variables = abstract_variables('lenet5_paper')
  per_layer = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in variables['params'].items()}
  assert per_layer == {'C1': 156, 'S2': 12, 'C3': 1516, 'S4': 32, 'C5': 48120, 'F6': 10164}
  assert variables['constants']['rbf_codes'].shape == (10, 84)  # 840 fixed, not trained.


def test_lenet5_c3_connection_table_matches_the_paper():
  # LeCun et al. 1998, Table I, rows = S2 maps, columns = C3 maps.
  table = ['X   XXX  XXXX XX',
           'XX   XXX  XXXX X',
           'XXX   XXX  X XXX',
           ' XXX  XXXX  X XX',
           '  XXX  XXXX XX X',
           '   XXX  XXXX XXX']
  expected = np.array([[c == 'X' for c in row] for row in table])
  np.testing.assert_array_equal(lenet.c3_connections(), expected)
  assert expected.sum() == 60


def test_plain_imagenet_twins_drop_only_the_projections():
  _, res = abstract_variables('resnet18')
  _, plain = abstract_variables('plain18')
  flat = lambda v: {jax.tree_util.keystr(p): x.shape
                    for p, x in jax.tree_util.tree_leaves_with_path(v['params'])}
  extra = {k for k in set(flat(res)) - set(flat(plain))}
  assert extra and all('projection' in k for k in extra)
  assert {k: s for k, s in flat(res).items() if k not in extra} == flat(plain)


TINY = [  # (config name in the zoo, input shape): every family, 10 classes.
    ('lenet5', None), ('lenet5_paper', None), ('alexnet_cifar', None), ('vgg16_cifar', None),
    ('resnet18_cifar', None), ('cifar_resnet20', None), ('cifar_plain20', None),
    ('alexnet', (67, 67, 3)),  # The paper's 11x11/4 conv1 and 5x5 two-tower conv2.
]


@pytest.mark.slow
@pytest.mark.parametrize('name,shape', TINY)
def test_forward_and_backward_step_on_a_tiny_batch(name, shape):
  # On XLA's convolutions and, where the library builds, on oneDNN's: every family's
  # convolutions reach the custom calls and give the same loss and gradients.
  cfg, zoo_shape, _, _, _ = summary.ZOO[name]
  shape = shape or zoo_shape
  x = jax.random.normal(jax.random.key(1), (2, *shape))
  labels = jnp.array([3, 7])
  convs = {'xla': convolution.conv_general_dilated}
  if not onednn.unbuildable_reason() and os.environ.get('CVJAX_NATIVE') != '0':
    convs['native'] = functools.partial(convolution.conv_general_dilated, native=True)
  results = {}
  for path, conv in convs.items():
    model = models.create_model(cfg, num_classes=10, dtype=jnp.float32, conv_general_dilated=conv)
    variables = model.init(jax.random.key(0), x)
    params = variables.pop('params')

    def loss_fn(p):
      logits, _ = model.apply({'params': p, **variables}, x, train=True,
                              rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
      assert logits.shape == (2, 10)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = results[path] = step(params)
    assert np.isfinite(loss)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)
    calls = step.lower(params).compile().as_text().count('cvjax_CvjaxConvForward')
    assert (calls > 0) == (path == 'native'), (path, calls)
  if 'native' in results:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max()))),
                 results['native'], results['xla'])


@pytest.mark.slow
def test_init_is_deterministic_for_every_family():
  for name in ('lenet5_paper', 'alexnet_cifar', 'resnet18_cifar'):
    cfg, shape, classes, _, _ = summary.ZOO[name]
    model = models.create_model(cfg, num_classes=classes, dtype=jnp.float32)
    x = jnp.zeros((1, *shape))
    a, b = model.init(jax.random.key(5), x), model.init(jax.random.key(5), x)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, a, b))


@pytest.mark.slow
def test_summary_table_rows():
  row = summary.describe('cifar_resnet20')
  assert row['params'] == 269_722 and row['weight_layers'] == 20
  # 19 3x3 convs + the head at batch 1: about 41M multiply-adds.
  assert 0.07 < row['gflops'] < 0.09
  assert summary.describe('resnet50')['weight_layers'] == 50
  text = summary.format_table([row], 'markdown')
  assert text.splitlines()[0].startswith('| model |') and '269,722' in text


def config_args():
  """(module, arg) for every arg of every config: the lists the files keep, and those below."""
  from configs import resnet, vgg  # pylint: disable=g-import-not-at-top
  return ([('lenet', a) for a in (None, 'modern', 'paper', 'quick')]
          + [('alexnet', a) for a in (None, 'imagenet', 'imagenet_torchvision', 'cifar10')]
          + [('resnet', a) for a in (None, 'quick', 'resnet8', 'resnet20', 'resnet56', 'resnet110',
                                     'resnet1202', 'plain20', 'plain56', 'resnet20_modern',
                                     'imagenet_resnet50_tv2', 'imagenet_resnet50_mlperf',
                                     *resnet.IMAGENET)]
          + [('vgg', a) for a in vgg.ARGS])


def load_config(module, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{module}').get_config(arg)


class FieldsRead:
  """A config block that records which of its fields are read (as attributes or by get)."""

  def __init__(self, block):
    self._block, self.read = block, set()

  def __getattr__(self, name):
    self.read.add(name)
    return self._block[name]

  def get(self, name, default=None):
    self.read.add(name)
    return self._block.get(name, default)


@pytest.mark.parametrize('module,arg', config_args())
@pytest.mark.slow
def test_every_config_builds_its_model(module, arg):
  config = load_config(module, arg)
  model = models.create_model(config.model, num_classes=10, dtype=jnp.float32)
  size = config.input.image_size or 32
  channels = 1 if config.model.name == 'lenet5' else 3
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, size, size, channels))))
  assert jax.tree.leaves(variables['params'])


@pytest.mark.parametrize('module,arg', config_args())
def test_each_config_holds_only_the_model_fields_its_model_reads(module, arg):
  """No field inherited from another family's config, and none the builder lacks."""
  block = load_config(module, arg).model
  fields = FieldsRead(block)
  models.create_model(fields, num_classes=10, dtype=jnp.float32)
  assert fields.read == set(block), (f'configs/{module}.py:{arg}: model fields never read: '
                                     f'{sorted(set(block) - fields.read)}; read but absent: '
                                     f'{sorted(fields.read - set(block))}')


def test_only_the_cifar_resnets_carry_remat():
  """train.remat is implemented for resnet_cifar only. (The streaming input's fields stay in
  every config: dataset.pipeline=auto streams a large image folder whatever the model.)"""
  for module, arg in config_args():
    config = load_config(module, arg)
    assert ('remat' in config.train) == (config.model.name == 'resnet_cifar'), (module, arg)
    assert {'random_crop_area', 'random_crop_aspect', 'workers', 'threads'} <= set(config.input)


def test_every_config_in_the_docs_loads():
  """Each `configs/FILE.py[:arg]` the README, docs/ and experiments/ name (templates such as
  `imagenet_resnetN` aside) gives a config."""
  import re  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = [os.path.join(root, 'README.md')] + [
      os.path.join(d, f) for top in ('docs', 'experiments')
      for d, _, files in os.walk(os.path.join(root, top)) for f in files
      if f.endswith(('.md', '.py', '.sh'))]
  specs = set()
  for path in paths:
    with open(path, encoding='utf-8') as f:
      specs |= set(re.findall(r'configs/(\w+)\.py(?::([\w.]+))?', f.read()))
  specs = {(m, a or None) for m, a in specs if m != 'common' and not (a or '').endswith('N')}
  assert ('resnet', 'imagenet_resnet50') in specs and ('lenet', 'quick') in specs
  for module, arg in sorted(specs, key=str):
    assert load_config(module, arg).model.name, (module, arg)
