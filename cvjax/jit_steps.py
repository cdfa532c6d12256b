"""The jit-compiled steps of an experiment (`cvjax/experiment.py`), composed in one place
(`train_program`): one member's step (cvjax/steps.py), then a population's vmap by group
(cvjax/population.py), then k steps per call, then one `jax.jit` with the state's placement
and donation; the CPU split as two such programs."""

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from cvjax import population
from cvjax import runtime
from cvjax import sharding as sharding_lib
from cvjax import steps
from cvjax.data import input as data_input
from cvjax.ops import convolution

# A train step's arguments (state, data, batch, rng): a population's state, batch and rng by
# member; the data shared.
TRAIN_AXES = (0, None, 0, 0)


def train_program(per_member, k, split, state_sharding, metrics_sharding, options=None):
  """`(state, data, batch, rng) -> (state, metrics)` for `k` steps per call, compiled with XLA
  `options` (`runtime.program_options`):
  `per_member(fn, in_axes, combine)` makes a function of one member's arrays (`fn` with its
  options) the run's or the population's (`population.vectorize`); `k` > 1 steps are one
  `lax.scan` (`steps.multi_step`, the batch then has a leading axis of k); with `split`
  (`steps.split_backward`), forward and backward are two programs. The new state keeps
  `state_sharding`, the metrics `metrics_sharding`; the old state is donated."""
  outs = (state_sharding, metrics_sharding)
  if split:
    forward = jax.jit(per_member(steps.train_forward, TRAIN_AXES, None),
                      compiler_options=options)
    backward = jax.jit(per_member(steps.train_backward, (0, 0), population.states_and_metrics),
                       out_shardings=outs, donate_argnums=(0,), compiler_options=options)
    return lambda state, data, batch, rng: backward(state, forward(state, data, batch, rng))
  step = per_member(steps.train_step, TRAIN_AXES, population.states_and_metrics)
  return jax.jit(steps.multi_step(step, k) if k > 1 else step, out_shardings=outs,
                 donate_argnums=(0,), compiler_options=options)


def options(exp, group):
  """The step options of `group` (one run: the experiment; a population's group: from its own
  config, population.vary may change a recipe), its batch placed as its members are."""
  return steps.step_options(group.config, exp.mesh, exp.input.make_train_batch, group.model,
                            group.tx, population.member_batch_sharding(exp))


def _per_member(exp):
  def per_member(fn, in_axes, combine):
    return population.vectorize(
        exp, lambda g: functools.partial(fn, opts=options(exp, g)), in_axes, combine)
  return per_member


def compile_train_step(exp, k=1):
  """The train step of `exp`, `(state, data, batch, rng) -> (state, metrics)`, for `k` steps
  per call (`train.steps_per_call`); a single step may be two programs
  (`steps.split_backward`), k steps are one. A population's state, batch and rng are dicts by
  group, its metrics one array per metric with a member axis (members in order)."""
  return train_program(_per_member(exp), k, k == 1 and steps.split_backward(exp.config),
                       state_sharding(exp), population.member_axis_sharding(exp),
                       program_options(exp.config))


def jit_train_step(model, tx, config, mesh, make_train_batch, state_sharding=None):
  """One run's train step built without an experiment (the benchmarks, the mesh report), as
  `compile_train_step` builds it for k=1. The new state keeps `state_sharding`
  (cvjax.sharding.state_sharding; default: replicated)."""
  replicated = NamedSharding(mesh, P())
  opts = steps.step_options(config, mesh, make_train_batch, model, tx)
  return train_program(lambda fn, in_axes, combine: functools.partial(fn, opts=opts), 1,
                       steps.split_backward(config),
                       replicated if state_sharding is None else state_sharding, replicated,
                       program_options(config))


def program_options(config):
  """The XLA options of a program of this run (a population's members compute alike)."""
  return runtime.program_options(convolution.compute_dtype(config))


def state_sharding(exp):
  """Where the train state lives: a population's replicated or split along its member axis;
  one run's by cvjax.sharding's rules (replicated unless config.mesh splits it)."""
  if exp.population:
    return population.member_axis_sharding(exp)
  return sharding_lib.state_sharding(exp.abstract_state, exp.mesh, exp.config)


def jit_evaluation(exp):
  """(jitted eval step, the eval step's device-resident `test` data). A population's step
  evaluates every member on each batch (vmap by group): its outputs gain a member axis."""
  replicated = NamedSharding(exp.mesh, P())
  test_data = jax.device_put(exp.input.test_data, replicated)
  kw = dict(make_eval_batch=exp.input.make_eval_batch,
            batch_sharding=population.member_batch_sharding(exp),
            dtype=convolution.compute_dtype(exp.config),
            crops=data_input.eval_crops(exp.config), crop_size=exp.input.image_shape[0],
            padding=exp.input.eval_padding, flip=data_input.eval_flip(exp.config),
            translate=data_input.eval_translate(exp.config))
  step = population.vectorize(exp, lambda g: functools.partial(steps.eval_step, model=g.model,
                                                               **kw),
                              (0, None, None), population.concat_members)
  return jax.jit(step, out_shardings=replicated,
                 compiler_options=program_options(exp.config)), test_data


def jit_grad_norms(exp):
  """`steps.grad_norms`, jitted; a population's by group (its layers differ between groups)."""
  return jax.jit(_per_member(exp)(steps.grad_norms, TRAIN_AXES, None),
                 out_shardings=NamedSharding(exp.mesh, P()),
                 compiler_options=program_options(exp.config))
