"""The jit-compiled steps of an experiment (`cvjax/experiment.py`): one run's or a
population's (`jax.vmap` of the same steps over each group's members), k train steps per
dispatch, placed on the experiment's mesh; and the batch argument of in-memory steps."""

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from cvjax import population
from cvjax import sharding as sharding_lib
from cvjax import steps
from cvjax.data import input as data_input
from cvjax.ops import convolution


def member_sharding(exp):
  """Whether a population's members are split over the devices (each member's batch on one
  device: many members) rather than each member's batch (few members). Members must fill the
  devices evenly, group by group."""
  n = exp.mesh.size
  return exp.population and n > 1 and all(len(g.members) % n == 0 for g in exp.groups)


def state_sharding(exp):
  """Where the train state lives: a population's replicated or split along its member axis;
  one run's by cvjax.sharding's rules (replicated unless config.mesh splits it)."""
  if member_sharding(exp):
    return NamedSharding(exp.mesh, P('data'))
  if exp.population:
    return NamedSharding(exp.mesh, P())
  return sharding_lib.state_sharding(exp.abstract_state, exp.mesh, exp.config)


def _batch_args(exp, model, config, sharding=None):
  kw = steps.batch_args(model, config, exp.mesh, exp.input.make_train_batch)
  return kw if sharding is None else {**kw, 'batch_sharding': sharding}


def _population_parts(exp):
  """(vmap with the population's in_axes and member placement, a group's (batch arguments,
  update arguments) of its steps, from its own config: population.vary may change a recipe)."""
  split = member_sharding(exp)
  # Inside the vmap each member's batch is split over the devices, or, when the members are,
  # whole on its member's device (the vmap then places the member axis on 'data').
  sharding = NamedSharding(exp.mesh, P() if split else P('data'))

  def args(g):
    config = g.members[0].config
    return _batch_args(exp, g.model, config, sharding), steps.update_args(config)
  vmap = functools.partial(jax.vmap, spmd_axis_name='data' if split else None)
  return vmap, args


def _concat_members(metrics):
  return jax.tree.map(lambda *m: jnp.concatenate(m), *metrics)


def population_step(exp):
  """The train step of a population: `jax.vmap` of `steps.train_step` over each group's
  members, all groups in one program; `(states, data, batches, rngs)` are dicts by group, the
  metrics one array per metric with a member axis (members in order)."""
  vmap, args = _population_parts(exp)
  fns = {key: vmap(functools.partial(steps.train_step, tx=g.tx, **args(g)[1], **args(g)[0]),
                   in_axes=(0, None, 0, 0))
         for key, g in zip(exp.state_keys, exp.groups)}

  def step(states, data, batches, rngs):
    outs = {k: f(states[k], data, batches[k], rngs[k]) for k, f in fns.items()}
    return {k: st for k, (st, _) in outs.items()}, _concat_members([m for _, m in outs.values()])
  return step


def jit_population_split_step(exp):
  """`population_step` as two programs, forward and backward (`steps.split_backward`), each a
  vmap of `train_forward` / `train_backward` by group."""
  vmap, args = _population_parts(exp)
  fwd = {key: vmap(functools.partial(steps.train_forward, **args(g)[0]),
                   in_axes=(0, None, 0, 0)) for key, g in zip(exp.state_keys, exp.groups)}
  bwd = {key: vmap(functools.partial(steps.train_backward, tx=g.tx, **args(g)[1]))
         for key, g in zip(exp.state_keys, exp.groups)}
  forward = jax.jit(lambda states, data, batches, rngs: {
      k: f(states[k], data, batches[k], rngs[k]) for k, f in fwd.items()})

  def backward_all(states, outs):
    new = {}
    for k, f in bwd.items():
      vjp, metrics, new_vars = outs[k]
      new[k] = f(states[k], vjp, new_vars, metrics)
    return {k: st for k, (st, _) in new.items()}, _concat_members([m for _, m in new.values()])
  sharding = state_sharding(exp)
  backward = jax.jit(backward_all, out_shardings=(sharding, sharding), donate_argnums=(0,))
  return lambda states, data, batches, rngs: backward(states, forward(states, data, batches,
                                                                      rngs))


def jit_train_steps(exp, k=1):
  """`(state, data, batch, rng) -> (state, metrics)` for `k` steps (`train.steps_per_call`;
  the batch then has a leading axis of k), jit-compiled; a single step may be two programs
  (`steps.split_backward`), k steps are one."""
  if k == 1 and not exp.population:  # One program or split, as `steps.jit_train_step` decides.
    return steps.jit_train_step(exp.model, exp.tx, exp.config, exp.mesh,
                                exp.input.make_train_batch, state_sharding(exp))
  if k == 1 and steps.split_backward(exp.config):
    return jit_population_split_step(exp)
  if exp.population:
    step = population_step(exp)
  else:
    step = functools.partial(steps.train_step, tx=exp.tx, **steps.update_args(exp.config),
                             **_batch_args(exp, exp.model, exp.config))
  sharding = state_sharding(exp)
  metrics = sharding if exp.population else NamedSharding(exp.mesh, P())
  return jax.jit(steps.multi_step(step, k) if k > 1 else step,
                 out_shardings=(sharding, metrics), donate_argnums=(0,))


def indices_batch(exp, step, k):
  """The batch argument of steps [step, step + k) on in-memory data: each member's example
  indices in its own seed's data order, [k, members, batch] with the axes a single step or a
  single run does not have left out, placed as the train step wants them."""
  def one(t):
    if not exp.population:
      return exp.input.train_indices(exp.config.seed, t)
    return {key: np.stack([exp.input.train_indices(m.config.seed, t) for m in g.members])
            for key, g in zip(exp.state_keys, exp.groups)}
  batch = one(step) if k == 1 else population.stack([one(t) for t in range(step, step + k)])
  members = (('data', None) if member_sharding(exp) else (None, 'data')) if exp.population else (
      'data',)
  sharding = NamedSharding(exp.mesh, P(*(None,) * (k > 1), *members))
  return jax.tree.map(lambda x: {'indices': jax.device_put(x, sharding)}, batch)


def jit_evaluation(exp):
  """(jitted eval step, the eval step's device-resident `test` data). A population's step
  evaluates every member on each batch (vmap by group): its outputs gain a member axis."""
  replicated = NamedSharding(exp.mesh, P())
  test_data = jax.device_put(exp.input.test_data, replicated)
  split = member_sharding(exp)
  kw = dict(make_eval_batch=exp.input.make_eval_batch,
            batch_sharding=NamedSharding(exp.mesh, P() if split else P('data')),
            dtype=convolution.compute_dtype(exp.config),
            crops=data_input.eval_crops(exp.config), crop_size=exp.input.image_shape[0],
            padding=exp.input.eval_padding, flip=data_input.eval_flip(exp.config),
            translate=data_input.eval_translate(exp.config))
  if not exp.population:
    return jax.jit(functools.partial(steps.eval_step, model=exp.model, **kw),
                   out_shardings=replicated), test_data
  fns = {k: jax.vmap(functools.partial(steps.eval_step, model=g.model, **kw),
                     in_axes=(0, None, None), spmd_axis_name='data' if split else None)
         for k, g in zip(exp.state_keys, exp.groups)}

  def step(states, test, batch):
    outs = [f(states[k], test, batch) for k, f in fns.items()]
    return jax.tree.map(lambda *x: jnp.concatenate(x), *outs)
  return jax.jit(step, out_shardings=replicated), test_data


def jit_grad_norms(exp):
  """`steps.grad_norms`, jitted; a population's by group (its layers differ between groups)."""
  replicated = NamedSharding(exp.mesh, P())
  if not exp.population:
    return jax.jit(functools.partial(steps.grad_norms, **_batch_args(exp, exp.model, exp.config)),
                   out_shardings=replicated)
  fns = {k: jax.vmap(functools.partial(steps.grad_norms,
                                       **_batch_args(exp, g.model, exp.config, replicated)),
                     in_axes=(0, None, 0, 0)) for k, g in zip(exp.state_keys, exp.groups)}
  return jax.jit(lambda st, data, b, r: {k: f(st[k], data, b[k], r[k]) for k, f in fns.items()},
                 out_shardings=replicated)
