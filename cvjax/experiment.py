"""What a run builds from its config before it touches the workdir: the config checked, the
mesh, the input, the model, optimizer and abstract train state, and the fingerprint a
checkpoint must match; one run's, or a population's by group (cvjax/population.py)."""

import copy
import dataclasses
import json
import math
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp

from cvjax import checkpointing
from cvjax import config_checks
from cvjax import data as data_lib
from cvjax import models
from cvjax import optim
from cvjax import population
from cvjax import sharding as sharding_lib
from cvjax import steps
from cvjax.ops import convolution


@dataclasses.dataclass
class Group:
  """Members whose configs differ only by the seed: one model and optimizer, vmapped."""
  members: list  # population.Member
  model: Any
  schedule: Any
  tx: Any
  init: Any  # rng -> one member's TrainState.
  abstract_state: Any  # One member's.

  @property
  def config(self):
    return self.members[0].config  # The seed aside, every member's.


@dataclasses.dataclass
class Experiment:
  """One run, or a population of members trained together. A population's `init`,
  `abstract_state` and train step hold every group's state, by `state_keys`; `model`,
  `schedule` and `tx` are then those of its first group."""
  config: Any
  mesh: Any
  input: data_lib.Input
  model: Any
  schedule: Any
  tx: Any
  steps_per_epoch: int
  total_steps: int
  init: Any  # rng -> TrainState (a population: {key: rngs} -> {key: stacked TrainState}).
  abstract_state: Any
  fingerprint: dict  # What a checkpoint must match: the model, the data and its input shape.
  groups: list = dataclasses.field(default_factory=list)  # A population's; [] for one run.

  @property
  def population(self):
    return bool(self.groups)

  @property
  def members(self):
    return [m for g in self.groups for m in g.members]

  @property
  def state_keys(self):
    return [f'group{i}' for i in range(len(self.groups))]

  def rngs(self):
    """(init rng, train rng): one run's from its seed; a population's by group, each member's
    derived from its seed as a run alone."""
    if not self.population:
      return tuple(jax.random.split(jax.random.key(self.config.seed)))

    def keys(g, i):
      return jnp.stack([jax.random.split(jax.random.key(m.config.seed))[i] for m in g.members])
    return ({k: keys(g, 0) for k, g in zip(self.state_keys, self.groups)},
            {k: keys(g, 1) for k, g in zip(self.state_keys, self.groups)})

  def member_dirs(self, workdir):
    """{member: its folder}: one run's is the workdir ({None: workdir}); a population's
    members each have `members/<name>/`, laid out as an ordinary run's."""
    if not self.population:
      return {None: epath.Path(workdir)}
    return {m.name: epath.Path(workdir) / 'members' / m.name for m in self.members}

  def by_member(self, tree):
    """{member: its part} of a host tree whose leaves have a member axis ({None: tree})."""
    if not self.population:
      return {None: tree}
    return {m.name: jax.tree.map(lambda x, i=i: x[i], tree) for i, m in enumerate(self.members)}

  def by_member_of_groups(self, trees):
    """{member: its part} of {state key: tree with a member axis} (the train state, gradient
    norms)."""
    if not self.population:
      return {None: trees}
    return {m.name: jax.tree.map(lambda x, i=i: x[i], trees[k])
            for k, g in zip(self.state_keys, self.groups) for i, m in enumerate(g.members)}

  def nets(self):
    """{label: [member names]}: a population's groups (each net over its seeds), labelled as
    population.group_label; {} for one run."""
    return {population.group_label(g.members[0].name, self.config.model.name):
            [m.name for m in g.members] for g in self.groups}

  def member_configs(self):
    """{member: (its config, its group)}; one run's: {None: (config, the experiment)}, which
    has the group's `model` and `abstract_state`."""
    if not self.population:
      return {None: (self.config, self)}
    return {m.name: (m.config, g) for g in self.groups for m in g.members}


def build_state(config, num_classes, input_shape, total_steps, mesh=None):
  """(model, schedule, optimizer, initializer, abstract train state) of `config` for
  `num_classes` classes of `input_shape` images: what a checkpoint holds, built without the
  data (cvjax.import_weights writes checkpoints with it). On a `mesh` of several devices,
  grouped convolutions run per device (cvjax.sharding.grouped_per_device)."""
  if config.train.compute_dtype == 'auto':  # Called directly (cvjax.import_weights).
    config = with_devices(config, mesh)
  dtype = convolution.compute_dtype(config)
  model = models.create_model(config.model, num_classes=num_classes, dtype=dtype,
                              remat=config.train.get('remat'),
                              conv_general_dilated=sharding_lib.grouped_per_device(
                                  convolution.for_config(config), mesh))
  # Jitted: the loop logs schedule(step) from the host, and op-by-op it compiled each op (~1 s).
  schedule = jax.jit(optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                         total_steps))
  tx = optim.make_optimizer(config.optimizer, schedule, total_steps)
  init = steps.state_initializer(model, tx, input_shape, dtype,
                                 ema=config.train.ema_decay > 0)
  return model, schedule, tx, init, jax.eval_shape(init, jax.random.key(0))


# train.compute_dtype='auto' by platform: bfloat16 where it is the fast path (GPU and TPU
# matrix units; parameters, optimizer state, BatchNorm statistics, logits and loss stay
# float32), float32 on CPUs, where bfloat16 is slower (docs/performance.md).
AUTO_DTYPE = {'gpu': 'bfloat16', 'tpu': 'bfloat16'}


def with_devices(config, mesh=None):
  """`config` with what depends on the devices settled (a copy; the caller's stays as given):
  train.compute_dtype='auto' by the platform, and train.eval_batch_size rounded up to a
  multiple of the mesh's data axis. Evaluation pads its last batch and masks the padding, so
  a rounded batch changes no metric: the default 250 fits 1, 2 and 5 devices but not 4 or 8,
  1000 not 16."""
  t = config.train
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  dtype = AUTO_DTYPE.get(platform, 'float32') if t.compute_dtype == 'auto' else t.compute_dtype
  data = mesh.shape['data'] if mesh is not None else 1
  eval_batch = t.eval_batch_size
  if isinstance(eval_batch, int) and eval_batch > 0 and eval_batch % data:
    eval_batch = -(-eval_batch // data) * data
  if (dtype, eval_batch) == (t.compute_dtype, t.eval_batch_size):
    return config
  if dtype != t.compute_dtype:
    logging.info('train.compute_dtype=auto: %s on %s.', dtype, platform)
  if eval_batch != t.eval_batch_size:
    logging.info('train.eval_batch_size=%d rounded up to %d, a multiple of the %d devices of '
                 'the data axis (the padding is masked: the metrics are unchanged).',
                 t.eval_batch_size, eval_batch, data)
  config = copy.deepcopy(config)
  config.train.compute_dtype, config.train.eval_batch_size = dtype, eval_batch
  return config


def fingerprint(config, num_classes, input_shape, dataset=None):
  """What a checkpoint must match to be restored: the model, the data and its input shape.
  Without `dataset` (imported weights) it matches any data of that input shape and number of
  classes: checkpointing.check_fingerprint compares the fields both record. The optimizer's,
  the schedule's and the run length's settings are recorded, not matched: they may change when
  a run resumes, as long as the train state keeps its layout (checkpointing.check_layout)."""
  out = {'model': config.model.to_dict(), 'num_classes': num_classes,
         'input_shape': list(input_shape), checkpointing.RESUMABLE: json.loads(json.dumps({
             'optimizer': config.optimizer.to_dict(), 'schedule': config.schedule.to_dict(),
             'num_steps': config.train.num_steps, 'num_epochs': config.train.num_epochs,
             'batch_size': config.train.batch_size}))}  # As saved: tuples as lists.
  # A trained run's seed decided its initialisation and its data order up to the checkpoint:
  # a resume with another seed would record steps it did not run (checkpointing.check_seed).
  # An import has none: a fine-tune may start from it with any seed.
  return out if dataset is None else {**out, 'dataset': dataset, 'seed': config.seed}


def steps_for(config, num_train):
  """(steps per epoch, total steps): `train.num_steps` wins over `train.num_epochs`."""
  config_checks.check_data(config, num_train)
  per_epoch = num_train // config.train.batch_size  # The last partial batch is dropped.
  return per_epoch, config.train.num_steps or int(math.ceil(config.train.num_epochs * per_epoch))


def build(config, devices=None) -> Experiment:
  """The experiment of `config` on `devices` (default: all): checks the config and loads the
  data; writes nothing."""
  mesh = sharding_lib.make_mesh(config, devices)
  config = with_devices(config, mesh)
  config_checks.check_config(config, mesh.shape['data'])
  # Each member's config checked as its run's, before the data loads.
  members = (population.members(config, mesh.shape['data'])
             if population.is_population(config) else None)
  config_checks.warn_slow_dtype(config, mesh.devices.flat[0].platform,
                                convolution.native_for(config))
  inp = data_lib.make_input(config, mesh)
  input_shape = tuple(inp.image_shape)
  steps_per_epoch, total_steps = steps_for(config, inp.num_train)
  model, schedule, tx, init, abstract_state = build_state(config, inp.num_classes, input_shape,
                                                          total_steps, mesh)
  checked = fingerprint(config, inp.num_classes, input_shape, inp.fingerprint)
  if members is None:
    return Experiment(config, mesh, inp, model, schedule, tx, steps_per_epoch, total_steps, init,
                      abstract_state, checked)
  groups = [Group(ms, *build_state(ms[0].config, inp.num_classes, input_shape, total_steps))
            for ms in population.group_members(members)]
  keys = [f'group{i}' for i in range(len(groups))]
  stacked = lambda a, n: jax.ShapeDtypeStruct((n, *a.shape), a.dtype)

  def init_population(rngs):
    return {k: jax.vmap(g.init)(rngs[k]) for k, g in zip(keys, groups)}
  abstract = {k: jax.tree.map(lambda a, n=len(g.members): stacked(a, n), g.abstract_state)
              for k, g in zip(keys, groups)}
  checked['population'] = json.loads(json.dumps({  # As saved: tuples as lists.
      'members': [m.name for g in groups for m in g.members],
      'models': [g.members[0].config.model.to_dict() for g in groups]}))
  return Experiment(config, mesh, inp, groups[0].model, groups[0].schedule, groups[0].tx,
                    steps_per_epoch, total_steps, init_population, abstract, checked, groups)
