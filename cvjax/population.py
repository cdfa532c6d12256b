"""Populations: several members of one config trained together, in one jitted program.

`population.seeds=S` trains S members with seeds `seed, seed+1, ...`; `population.vary`
multiplies them by the values of model, optimizer or schedule fields, e.g.
`'model.residual=False,True'` (space-separated `field=v1,v2` items). Each member is exactly
the run `cvjax.main` would train alone with the member's config: its own initialisation, data
order, augmentation and dropout draws (all from its seed), on the data held once on the
device.

Members whose configs differ only by the seed form a group: one model, one optimizer, and a
train state with a leading member axis, trained by `jax.vmap` of the ordinary train step.
Groups that differ in a field (plain and residual twins, two depths, two learning rates) are
separate vmaps in the same program, so the model code never sees a member axis.

A population's workdir holds the whole population's checkpoints, and one folder per member,
`members/<name>/`, laid out as an ordinary run's (config.json, metrics.jsonl, results.json,
error_analysis/, TensorBoard events): TensorBoard overlays them, cvjax.tools.report reads them,
`cvjax.evaluate --member=NAME` evaluates one.

The end of this file holds what the steps need of a population: each group's vmap
(`vectorize`, used by cvjax/jit_steps.py for the train, eval and gradient-norm steps alike),
where the members and their batches live, and how the members' outputs are put together.
"""

import ast
import dataclasses
import itertools
import json
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from cvjax import config_checks
from cvjax.errors import UserError

# What a member may change: the net and its training, not the data, the batch or the run length
# (those are shared by every member of the one program).
VARIABLE_SECTIONS = ('model', 'optimizer', 'schedule')


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  config: object  # ml_collections.ConfigDict: what cvjax.main would train alone.


is_population = config_checks.is_population  # Defined there, with the checks that use it.


def parse_vary(config, text):
  """`'model.residual=False,True optimizer.learning_rate=0.1,0.05'` -> [(field, values)],
  each value of the type the config's field holds."""
  out = []
  for item in text.split():
    field, eq, values = item.partition('=')
    section, _, key = field.partition('.')
    if not eq or not values or section not in VARIABLE_SECTIONS or not key:
      raise UserError(
          f'population.vary item {item!r}: expected FIELD=V1,V2,... with FIELD in '
          f'{", ".join(s + ".*" for s in VARIABLE_SECTIONS)}, e.g. '
          "population.vary='model.residual=False,True'. The data, the batch and the run length "
          'are shared by every member.')
    if key not in config[section]:
      raise UserError(f'population.vary names {field}, which this config does not have; '
                      f'{section} has: {", ".join(sorted(config[section]))}.')
    current = config[section][key]
    parsed = [_parse(field, v, current) for v in values.split(',')]
    if len(set(map(repr, parsed))) != len(parsed):
      raise UserError(f'population.vary item {item!r} repeats a value.')
    out.append((field, parsed))
  if len({f for f, _ in out}) != len(out):
    raise UserError(f'population.vary={text!r} names a field twice.')
  return out


def _parse(field, text, current):
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f'population.vary: {field}={text!r} is not a value like the field\'s '
                    f'current {current!r}.') from None
  if isinstance(current, bool) != isinstance(value, bool) or (
      isinstance(current, (int, float)) and not isinstance(value, (int, float))) or (
          isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float)):
    raise UserError(f'population.vary: {field}={text!r} has type {type(value).__name__}; the '
                    f'field holds a {type(current).__name__} ({current!r}).')
  return float(value) if isinstance(current, float) else value


def members(config, num_devices=1):
  """The members, grouped: the members of a group (same config but the seed) are adjacent.
  Each member's config passes the checks a run's own config gets (cvjax/config_checks.py,
  over `num_devices`), and every varied field must be one its run reads: a member is the run
  its config would train alone, so it is held to that run's rules."""
  pop = config.population
  seeds = pop.seeds
  if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
    raise UserError(f'population.seeds={seeds!r}; expected an integer >= 1 (members per set of '
                    'population.vary values, seeds seed, seed+1, ...).')
  vary = parse_vary(config, pop.vary)
  out = []
  for values in itertools.product(*[v for _, v in vary]):
    for i in range(seeds):
      c = config.copy_and_resolve_references()
      for (field, _), value in zip(vary, values):
        section, key = field.split('.', 1)
        c[section][key] = value
      c.seed = config.seed + i
      c.population.seeds, c.population.vary = 1, ''
      label = [f'{f.split(".")[-1]}{_label(v)}' for (f, _), v in zip(vary, values)]
      name = '_'.join(label + [f'seed{c.seed}'])
      try:
        config_checks.check_config(c, num_devices)
        config_checks.check_read(c, [f for f, _ in vary])
      except UserError as e:
        raise UserError(f'population member {name}: {e} (Each member is checked as the run '
                        'its config would train alone; change population.vary or seed.)'
                        ) from None
      out.append(Member(name, c))
  return out


def _label(value):
  return repr(value) if isinstance(value, float) else str(value)


def group_members(members_):
  """[[member, ...], ...]: members whose configs differ only by the seed, in order."""
  groups, keys = [], []
  for m in members_:
    key = _without_seed(m.config)
    if keys and keys[-1] == key:
      groups[-1].append(m)
    else:
      keys.append(key)
      groups.append([m])
  return groups


def _without_seed(config):
  d = json.loads(config.to_json_best_effort())
  d.pop('seed', None)
  return json.dumps(d, sort_keys=True)


def stack(trees):
  """The trees of the members as one tree with a leading member axis."""
  return jax.tree.map(lambda *x: np.stack(x), *trees)


def group_label(member_name, model_name=''):
  """A member's group, named as its members without the seed: 'residualFalse_seed3' ->
  'residualFalse'; a population that varies only the seed has one group, `model_name`."""
  return re.sub(r'_?seed-?\d+$', '', member_name or '') or model_name


def by_group(names, model_name=''):
  """{group label: [member names]} in order: the nets of a population, each over its seeds."""
  out = {}
  for name in names:
    out.setdefault(group_label(name, model_name), []).append(name)
  return out


def mean_std(values):
  """(mean, standard deviation over the seeds (ddof 1; 0 for one value)) of a group's values."""
  values = np.asarray(values, np.float64)
  return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


# --- A population's steps: each group's vmap, the members' placement, their outputs. ---


def member_sharding(exp):
  """Whether a population's members are split over the devices (each member's batch on one
  device: many members) rather than each member's batch (few members). Members must fill the
  devices evenly, group by group. False for one run."""
  n = exp.mesh.size
  return exp.population and n > 1 and all(len(g.members) % n == 0 for g in exp.groups)


def member_axis_sharding(exp):
  """Where arrays with a member axis live (a population's train state, every step's metrics):
  split along it with the members, else replicated (one run's metrics)."""
  return NamedSharding(exp.mesh, P('data') if member_sharding(exp) else P())


def member_batch_sharding(exp):
  """Where one member's batch lives inside the steps: split over the devices, or, when the
  members are, whole on its member's device (the vmap then places the member axis on
  'data')."""
  return NamedSharding(exp.mesh, P() if member_sharding(exp) else P('data'))


def batch_axes(exp):
  """The mesh axes of a batch argument's [members, examples] axes; one run's [examples]."""
  if not exp.population:
    return ('data',)
  return ('data', None) if member_sharding(exp) else (None, 'data')


def per_member(exp, fn):
  """`fn(config)` of one run; of each member of a population, stacked by group."""
  if not exp.population:
    return fn(exp.config)
  return {key: np.stack([fn(m.config) for m in g.members])
          for key, g in zip(exp.state_keys, exp.groups)}


def vectorize(exp, fn_of_group, in_axes, combine=None):
  """`fn_of_group(group)`, a function of one member's arrays, as a function of the
  experiment's: one run's is `fn_of_group(exp)`; a population's takes the arguments of
  `in_axes` 0 as dicts by group (None: shared by every member), runs each group's function
  vmapped over its members (placed as `member_sharding` says), and returns
  `combine({group key: output})` (default: that dict)."""
  if not exp.population:
    return fn_of_group(exp)
  spmd_axis_name = 'data' if member_sharding(exp) else None
  fns = {key: jax.vmap(fn_of_group(g), in_axes=in_axes, spmd_axis_name=spmd_axis_name)
         for key, g in zip(exp.state_keys, exp.groups)}

  def run(*args):
    outs = {key: f(*[a[key] if axis == 0 else a for a, axis in zip(args, in_axes)])
            for key, f in fns.items()}
    return outs if combine is None else combine(outs)
  return run


def concat_members(outs):
  """{group key: tree with a member axis} -> one tree, the members in order."""
  return jax.tree.map(lambda *m: jnp.concatenate(m), *outs.values())


def states_and_metrics(outs):
  """{group key: (state, metrics)} -> ({group key: state}, metrics of every member)."""
  return ({key: state for key, (state, _) in outs.items()},
          concat_members({key: metrics for key, (_, metrics) in outs.items()}))
