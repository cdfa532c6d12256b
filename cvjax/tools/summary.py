"""Prints the model zoo as a table: parameters, the papers' counts, forward FLOPs, depth.

  python -m cvjax.tools.summary                       # every model
  python -m cvjax.tools.summary --models=vgg16,resnet50 --format=markdown
  python -m cvjax.tools.summary --models=alexnet,vgg16 --mesh=4x2 --fsdp   # state per device

Shapes come from `jax.eval_shape` (nothing is allocated: VGG-19's 144M parameters are
counted, not built). With `--mesh=DATAxMODEL` (and `--fsdp`) the table adds the bytes of
parameters and SGD-momentum state each device holds under cvjax.sharding's rules: computed
from the shapes on an abstract mesh, so no such devices are needed. FLOPs per image are XLA's cost analysis of the compiled forward pass
at batch 1 in float32, which counts a multiply-add as 2 FLOPs (papers that quote "FLOPs",
like the ResNet paper's Table 1, usually count multiply-adds: half of ours).
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from cvjax import models
from cvjax import runtime

_MODELS = flags.DEFINE_list('models', [], 'Models to show (default: all).')
_FORMAT = flags.DEFINE_enum('format', 'text', ['text', 'markdown'], 'Table format.')
_MESH = flags.DEFINE_string('mesh', '', 'DATAxMODEL, e.g. 4x2: add the state bytes per device '
                            'on that (data, model) mesh (config.mesh.model = MODEL).')
_FSDP = flags.DEFINE_bool('fsdp', False, 'With --mesh: parameters and optimizer state also '
                          'split over data (config.mesh.fsdp).')


def _cfg(name, **kw):
  defaults = dict(activation='relu', residual=True, batch_norm=True, bn_momentum=0.9,
                  zero_init_residual=False, dropout_rate=0.5, groups=2)
  return ConfigDict({'name': name, **defaults, **kw})


# name: (model config, input HxWxC, classes, reference parameter count, what the paper states).
# Reference counts are exact counts of the published architectures (torchvision's for
# AlexNet one-tower, VGG and ResNet, which follow the papers); None where there is none.
ZOO = {
    'lenet5': (_cfg('lenet5', activation='tanh'), (32, 32, 1), 10, None, '-'),
    'lenet5_paper': (_cfg('lenet5', variant='paper', activation='scaled_tanh'), (32, 32, 1), 10,
                     60_000, '60,000'),
    'alexnet': (_cfg('alexnet'), (227, 227, 3), 1000, 60_965_224, '60M'),
    'alexnet_1tower': (_cfg('alexnet', groups=1), (227, 227, 3), 1000, 62_378_344, '-'),
    'alexnet_torchvision': (_cfg('alexnet', variant='torchvision', groups=1), (224, 224, 3),
                            1000, 61_100_840, '-'),
    **{f'vgg{d}': (_cfg('vgg', depth=d, batch_norm=False), (224, 224, 3), 1000, ref, paper)
       for d, ref, paper in ((11, 132_863_336, '133M'), (13, 133_047_848, '133M'),
                             (16, 138_357_544, '138M'), (19, 143_667_240, '144M'))},
    'vgg16_bn': (_cfg('vgg', depth=16), (224, 224, 3), 1000, None, '-'),
    **{f'resnet{d}': (_cfg('resnet', depth=d), (224, 224, 3), 1000, ref, '-')
       for d, ref in ((18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                      (101, 44_549_160), (152, 60_192_808))},
    'resnet50_v1.5': (_cfg('resnet', depth=50, stride_in_bottleneck='3x3'), (224, 224, 3), 1000,
                      25_557_032, '-'),
    **{f'plain{d}': (_cfg('resnet', depth=d, residual=False), (224, 224, 3), 1000, None, '-')
       for d in (18, 34, 50)},
    **{f'cifar_resnet{d}': (_cfg('resnet_cifar', depth=d), (32, 32, 3), 10, None, paper)
       for d, paper in ((20, '0.27M'), (32, '0.46M'), (44, '0.66M'), (56, '0.85M'),
                        (110, '1.7M'))},
    **{f'cifar_plain{d}': (_cfg('resnet_cifar', depth=d, residual=False), (32, 32, 3), 10, None,
                           '-') for d in (20, 56)},
    'alexnet_cifar': (_cfg('alexnet'), (32, 32, 3), 10, None, '-'),
    'vgg16_cifar': (_cfg('vgg', depth=16, batch_norm=True), (32, 32, 3), 10, None, '-'),
    'resnet18_cifar': (_cfg('resnet', depth=18), (32, 32, 3), 10, None, '-'),
}


def weight_layers(variables):
  """Layers with weights on the main path: conv/dense kernels and the fixed RBF codes;
  projection shortcuts are not counted (the papers' depths do not count them)."""
  count = 0
  for path, _ in jax.tree_util.tree_leaves_with_path(variables):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if keys[-1] in ('kernel', 'rbf_codes') and not any('projection' in k for k in keys):
      count += 1
  return count


def parse_mesh(text):
  """'4x2' -> (4, 2)."""
  try:
    data, model = (int(v) for v in text.lower().split('x'))
    if data < 1 or model < 1:
      raise ValueError
  except ValueError:
    raise app.UsageError(f'--mesh={text!r}; expected DATAxMODEL, two positive integers such as '
                         '4x2.') from None
  return data, model


def state_bytes(cfg, variables, mesh_shape, fsdp=False):
  """Bytes per device of the parameters and the optimizer state (SGD with momentum, as every
  config trains with) on a (data, model) mesh of `mesh_shape`, under cvjax.sharding's rules."""
  import optax  # pylint: disable=g-import-not-at-top
  from cvjax import sharding, steps  # pylint: disable=g-import-not-at-top
  params = variables['params']
  state = steps.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      model_state={k: v for k, v in variables.items() if k != 'params'},
      opt_state=jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, params))
  mesh = jax.sharding.AbstractMesh(mesh_shape, ('data', 'model'))
  config = ConfigDict({'model': cfg, 'mesh': {'model': mesh_shape[1], 'fsdp': fsdp}})
  return sharding.device_bytes(state, sharding.state_sharding(state, mesh, config))


def describe(name, mesh_shape=None, fsdp=False):
  """One table row for the zoo entry `name` (with the state bytes per device on a
  (data, model) mesh of `mesh_shape`)."""
  cfg, shape, classes, reference, paper = ZOO[name]
  model = models.create_model(cfg, num_classes=classes, dtype=jnp.float32)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
  params = sum(v.size for v in jax.tree.leaves(variables['params']))
  # The model's default convolution is XLA's: its cost analysis counts them (it cannot see
  # inside oneDNN's custom calls).
  compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row = {'model': name, 'input': 'x'.join(map(str, shape)), 'params': params,
         'reference': reference, 'paper': paper, 'gflops': cost['flops'] / 1e9,
         'weight_layers': weight_layers(variables)}
  if mesh_shape:
    row['device_bytes'] = state_bytes(cfg, variables, mesh_shape, fsdp)
  return row


def format_table(rows, fmt='text'):
  header = ['model', 'input', 'parameters', 'reference', 'paper says', 'GFLOPs/image',
            'weight layers']
  cells = [[r['model'], r['input'], f'{r["params"]:,}',
            '-' if r['reference'] is None else
            (f'{r["reference"]:,}' + ('' if r['reference'] == r['params'] else ' (differs)')),
            r['paper'], f'{r["gflops"]:.3g}', str(r['weight_layers'])] for r in rows]
  if rows and 'device_bytes' in rows[0]:
    header += ['params MiB/device', 'optimizer MiB/device']
    for row, r in zip(cells, rows):
      row += [f'{r["device_bytes"][k] / 2 ** 20:.1f}' for k in ('params', 'opt_state')]
  if fmt == 'markdown':
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(c) + ' |' for c in cells])
  widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths))
                   for row in [header] + cells)


def main(argv):
  runtime.configure()
  del argv
  names = _MODELS.value or list(ZOO)
  unknown = [n for n in names if n not in ZOO]
  if unknown:
    raise app.UsageError(f'unknown models {unknown}; expected some of: {", ".join(ZOO)}')
  start = time.perf_counter()
  mesh_shape = parse_mesh(_MESH.value) if _MESH.value else None
  rows = [describe(n, mesh_shape, _FSDP.value) for n in names]
  print(format_table(rows, _FORMAT.value))
  if mesh_shape:
    print(f'State per device on a data={mesh_shape[0]} x model={mesh_shape[1]} mesh'
          f'{" with FSDP" if _FSDP.value else ""} (cvjax/sharding.py; optimizer: SGD momentum).')
  print(f'\n{len(rows)} models in {time.perf_counter() - start:.1f}s. FLOPs: XLA cost analysis '
        'of the compiled forward pass, batch 1, multiply-add = 2 FLOPs.')


if __name__ == '__main__':
  app.run(main)
