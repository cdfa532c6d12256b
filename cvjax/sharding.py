"""Where the train state lives: a 2-D (data, model) mesh and a table of rules per parameter.

The batch is split along `data`; `mesh.model` devices hold one copy of the batch and split the parameters named by the model's rules (a regex over the
state's paths -> the PartitionSpec of the leaf's last dimensions, first match wins, as in
big_vision's and MaxText's sharding rules):

- AlexNet's two towers (Krizhevsky et al. 2012, section 3.2): every conv's output channels
  split over `model`, so with `model.groups=2` and `mesh.model=2` each device holds one
  tower's kernels of conv1, conv2, conv4 and conv5, and conv3 and the dense layers take their
  inputs from both, where the paper's GPUs communicate.
- Dense classifier of AlexNet and VGG, tensor-parallel (Megatron's column/row split): fc6 by
  output columns, fc7 by input rows (its partial sums are all-reduced), fc8 by columns.
- `mesh.fsdp=True`: each parameter and its optimizer state also split over `data` along its
  largest dimension that `data` divides (big_vision's FSDP); XLA gathers it where a layer needs
  it, and each device keeps its slice of the summed gradient.

The same rules shard the parameters, the optimizer state (whose paths end in the parameter's)
and the checkpoint's restore target, so a checkpoint written on one mesh restores on another.
Rules name the last dimensions of a leaf, so a leading axis (a population's members) would stay
whole. A dimension the mesh axis does not divide stays unsplit. BatchNorm statistics stay
replicated: under jit the batch mean of a batch sharded over `data` is the global one. Grouped
convolutions need help to run per device (`grouped_per_device`), and `count_collectives` reads
what a compiled step exchanges (tests/test_sharding.py, docs/parallelism.md).
"""

import functools
import re

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from cvjax import config_checks

# Megatron's split of a dense stack: columns, rows, columns (the logits' reduction is small).
_CLASSIFIER = (
    (r'(^|/)fc6/(kernel|bias)$', P('model')),
    (r'(^|/)fc7/kernel$', P('model', None)),
    (r'(^|/)fc8/(kernel|bias)$', P('model')),
)
RULES = {
    'alexnet': ((r'(^|/)conv\d/(kernel|bias)$', P('model')),) + _CLASSIFIER,
    'vgg': _CLASSIFIER,
}
FSDP_MIN_SIZE = 1024  # Leaves with fewer elements stay replicated: a gather costs more.


def make_mesh(config, devices=None):
  """The (data, model) mesh of `config.mesh`: `mesh.model` devices per model replica."""
  devices = list(devices if devices is not None else jax.devices())
  model = config_checks.check_mesh(config, len(devices), jax.local_device_count(),
                                   jax.process_count())
  if model > 1 and config.model.name not in RULES:
    logging.warning('mesh.model=%d: %s has no model-parallel rules (cvjax.sharding.RULES has '
                    '%s); its state is replicated over model and each of those devices '
                    'computes the same.', model, config.model.name, ', '.join(RULES))
  return jax.make_mesh((len(devices) // model, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def path_str(path):
  """'params/conv1/kernel' for a key path of the train state."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _fits(spec, shape, mesh):
  """`spec` (of the last dims) as a full PartitionSpec of `shape`, dims the axis does not
  divide left unsplit."""
  spec = (None,) * (len(shape) - len(spec)) + tuple(spec)
  return tuple(a if a is None or shape[i] % mesh.shape[a] == 0 else None
               for i, a in enumerate(spec))


def _fsdp(spec, shape, mesh):
  """`spec` with the largest dimension still unsplit that `data` divides split over it."""
  if np.prod(shape) < FSDP_MIN_SIZE or mesh.shape['data'] == 1:
    return spec
  free = [i for i in np.argsort(shape)[::-1]
          if spec[i] is None and shape[i] % mesh.shape['data'] == 0]
  return spec if not free else tuple('data' if i == free[0] else a for i, a in enumerate(spec))


def partition_spec(path, shape, mesh, rules, fsdp=False):
  """The PartitionSpec of one leaf of the train state at `path` (a 'params/...' string)."""
  if len(shape) == 0 or mesh.size == 1:
    return P()
  spec = next((_fits(s, shape, mesh) for regex, s in rules if re.search(regex, path)),
              (None,) * len(shape))
  if fsdp and path.startswith(('params/', 'opt_state/', 'ema/params/')):
    spec = _fsdp(spec, shape, mesh)
  return P(*spec)


def state_sharding(abstract_state, mesh, config):
  """A NamedSharding for every leaf of `abstract_state` (a TrainState of ShapeDtypeStructs,
  or arrays): for jit's out_shardings and the checkpoint's restore target."""
  rules = RULES.get(config.model.name, ()) if mesh.shape.get('model', 1) > 1 else ()
  fsdp = config.mesh.fsdp
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, partition_spec(path_str(p), x.shape, mesh, rules, fsdp)),
      abstract_state)


def device_bytes(abstract_state, shardings):
  """{'params', 'opt_state', 'model_state', 'ema', 'total'}: bytes of the state on each device
  (every split dimension is divided evenly, so all devices hold the same)."""
  out = {}
  for field in ('params', 'opt_state', 'model_state', 'ema'):
    leaves = jax.tree.leaves(getattr(abstract_state, field, None))
    shards = jax.tree.leaves(getattr(shardings, field, None))
    out[field] = sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                     for x, s in zip(leaves, shards))
  out['total'] = sum(out.values())
  return out


def describe(abstract_state, shardings, mesh):
  """One line for the log: the mesh and the state's bytes per device."""
  b = device_bytes(abstract_state, shardings)
  mib = lambda n: f'{n / 2 ** 20:.1f} MiB'
  return (f'mesh data={mesh.shape["data"]} x model={mesh.shape["model"]}: train state '
          f'{mib(b["total"])} per device (params {mib(b["params"])}, optimizer '
          f'{mib(b["opt_state"])}, other {mib(b["model_state"])})')


def grouped_per_device(conv, mesh):
  """`conv` (a `conv_general_dilated`, the op the model is built with) where grouped
  convolutions run per device inside jax.shard_map: each device convolves its own rows of the
  batch (`data`) and, where `model` divides the groups, its own groups. With `model.groups=2`
  on `mesh.model=2` each device holds one tower, as in the paper. XLA's partitioner does not
  find either split by itself: it gathered the whole batch for the kernel gradients of
  conv2, conv4 and conv5 (on a `data` mesh too), and their kernels and inputs over `model`.
  With more `model` devices than groups every one of them convolves all groups (left to XLA,
  the partitioner aborted, or with the features constrained whole gave kernels 2e-5 off after
  one step, where other meshes agree to 1e-7). Ungrouped convolutions, and any convolution on a one-device mesh, go to `conv`."""
  if mesh is None or mesh.size == 1:
    return conv

  @functools.wraps(conv)
  def grouped(lhs, rhs, window_strides, padding, *args, feature_group_count=1, **kw):
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, kw.get('dimension_numbers'))
    last = lhs.ndim - 1  # Features last (NHWC, HWIO), as Flax's nn.Conv lays them out.
    if (feature_group_count == 1 or args or dims.lhs_spec[:2] != (0, last)
        or dims.rhs_spec[0] != last or dims.out_spec[:2] != (0, last)):
      return conv(lhs, rhs, window_strides, padding, *args,
                  feature_group_count=feature_group_count, **kw)
    d, m = mesh.shape['data'], mesh.shape['model']
    rows = 'data' if d > 1 and lhs.shape[0] % d == 0 else None  # Not the batch of 1 of init.
    groups = 'model' if m > 1 and feature_group_count % m == 0 else None
    manual = {a for a, on in (('data', rows), ('model', m > 1)) if on}
    if not manual:
      return conv(lhs, rhs, window_strides, padding, feature_group_count=feature_group_count,
                  **kw)
    local = functools.partial(conv, window_strides=window_strides, padding=padding,
                              feature_group_count=feature_group_count // (m if groups else 1),
                              **kw)
    features = P(*(None,) * last, groups)
    images = P(rows, *(None,) * (last - 1), groups)
    return jax.shard_map(local, mesh=mesh, in_specs=(images, features), out_specs=images,
                         axis_names=manual, check_vma=False)(lhs, rhs)
  return grouped


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


def count_collectives(hlo_text):
  """{collective: how many} in a compiled program's HLO text (`compiled.as_text()`); the
  asynchronous pairs (`all-gather-start`/`-done`) count once."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for op in re.findall(r'\s(' + '|'.join(COLLECTIVES) + r')(-start)?\(', hlo_text):
    counts[op[0]] += 1
  return counts
