"""The host memory a run will take, estimated before it allocates anything, beside what the
machine has: a population too large for the machine would otherwise be killed by the kernel's
out-of-memory killer with nothing printed after start-up.

The estimate adds what the run will allocate beyond what it holds once built, for in-memory
data on a CPU (where the train state, the data and XLA's buffers all live in host memory): the
train state (every member's), the device copy of the data, the larger of the train step's and
the evaluation step's temporaries (never held at once), and the evaluation's predictions. The
temporaries are first traced (the activations each member's backward pass keeps; every layer's
output for an eval batch): about a second. When that estimate reaches half the memory
available, they are taken from XLA's memory analysis of the compiled steps instead (forward
and backward as the run splits them; the evaluation of all members), and the run is refused
only when that estimate exceeds the memory available (/proc/meminfo MemAvailable): it is a
floor (the steps' outputs, JAX's and the input's own buffers come on top).
CVJAX_IGNORE_MEMORY_ESTIMATE=1 runs it anyway.
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cvjax import jit_steps
from cvjax import steps
from cvjax.data import input as data_input
from cvjax.errors import UserError

GiB = 2 ** 30
OVERRIDE = 'CVJAX_IGNORE_MEMORY_ESTIMATE'


def available_bytes():
  """The host memory available to a new allocation (MemAvailable), or None where unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _bytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                     if not hasattr(x, 'dtype') else x.dtype),
                      tree)


def _analysis(fn, *args):
  """XLA's memory analysis of `fn` compiled for `args` (ShapeDtypeStructs)."""
  return jax.jit(fn).lower(*args).compile().memory_analysis()


def step_bytes(exp, config, model, tx, abstract_state, precise):
  """Peak temporaries of one member's train step: traced, the activations its backward pass
  keeps (the forward's residuals); `precise`, XLA's memory analysis of the compiled step, as
  the run splits it (the residuals stay while the backward program runs)."""
  data = _shapes(exp.input.train_data)
  batch = {'indices': _shapes(exp.input.train_indices(config.seed, 0))}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  opts = steps.step_options(config, exp.mesh, exp.input.make_train_batch, model, tx)
  forward = functools.partial(steps.train_forward, opts=opts)
  if not precise:
    return _bytes(jax.eval_shape(forward, abstract_state, data, batch, rng)[0])
  if steps.split_backward(config):
    f = _analysis(forward, abstract_state, data, batch, rng)
    residuals = jax.eval_shape(forward, abstract_state, data, batch, rng)
    b = _analysis(functools.partial(steps.train_backward, opts=opts), abstract_state, residuals)
    return max(f.temp_size_in_bytes, f.output_size_in_bytes + b.temp_size_in_bytes)
  return _analysis(functools.partial(steps.train_step, opts=opts),
                   abstract_state, data, batch, rng).temp_size_in_bytes


def eval_bytes(exp, model, abstract_state, n, precise):
  """The evaluation step's temporaries: traced, every layer's output for one eval batch (XLA
  frees most as it goes: an upper bound) times the `n` members; `precise`, XLA's memory
  analysis of the whole compiled eval step (all members), once (`n` None)."""
  if precise:
    eval_step, _ = jit_steps.jit_evaluation(exp)
    return eval_step.lower(exp.abstract_state, _shapes(exp.input.test_data), _shapes(
        next(iter(exp.input.eval_batches())))).compile().memory_analysis().temp_size_in_bytes
  views = data_input.eval_crops(exp.config) * (2 if data_input.eval_flip(exp.config) else 1)
  x = jax.ShapeDtypeStruct((exp.config.train.eval_batch_size * views, *exp.input.image_shape),
                           jnp.dtype(exp.config.train.compute_dtype))
  variables = {'params': abstract_state.params, **abstract_state.model_state}
  _, captured = jax.eval_shape(functools.partial(
      model.apply, train=False, capture_intermediates=True, mutable=['intermediates']),
                               variables, x)
  return n * _bytes(captured)


def estimate(exp, precise=False):
  """{part: bytes} of the host memory the run will allocate beyond what it holds now (the
  data it loaded is held already; MemAvailable counts it as used), in-memory data only; None
  where not estimated (streamed data, whose batches come from worker processes). `precise`:
  the temporaries from XLA's memory analysis of the compiled steps (seconds to a minute of
  compilation) rather than traced (about a second)."""
  if exp.input.train_indices is None:
    return None
  state = step = evaluation = 0
  for g in exp.groups or [None]:
    if g is None:
      config, model, tx, abstract, n = exp.config, exp.model, exp.tx, exp.abstract_state, 1
    else:
      config, model, tx, abstract, n = (g.members[0].config, g.model, g.tx, g.abstract_state,
                                        len(g.members))
    state += n * _bytes(abstract)
    step += n * step_bytes(exp, config, model, tx, abstract, precise)
    if not precise:
      evaluation += eval_bytes(exp, model, abstract, n, precise)
  if precise:
    evaluation = eval_bytes(exp, None, None, None, precise)
  members = len(exp.members) or 1
  # Every eval batch's top-5 classes (int32) and confidence (float32), per member, on the
  # device and on the host.
  num_test = exp.input.num_test + exp.config.train.eval_batch_size
  return {'train state': state,
          'data on the device': _bytes(_shapes((exp.input.train_data, exp.input.test_data))),
          'train step': step, 'evaluation step': evaluation,
          'predictions': 2 * members * num_test * (5 * 4 + 4)}


def total(parts):
  """The train and evaluation steps' temporaries are never held at once."""
  return (sum(parts.values()) - parts['train step'] - parts['evaluation step']
          + max(parts['train step'], parts['evaluation step']))


def fmt(n):
  return f'{n / GiB:.2f} GiB' if n >= GiB / 10 else f'{n / 2 ** 20:.0f} MiB'


def check(exp):
  """Logs the estimate beside the memory available; refuses a run that clearly cannot fit
  (CVJAX_IGNORE_MEMORY_ESTIMATE=1: runs it anyway, with a warning)."""
  if jax.default_backend() != 'cpu':
    return None  # Accelerators hold the state in their own memory: XLA reports running out.
  available = available_bytes()
  try:
    parts, how = estimate(exp), 'by tracing the step'
    if parts is not None and available is not None and total(parts) > available / 2:
      parts, how = estimate(exp, precise=True), "by XLA's memory analysis"
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not estimate the memory this run needs (%s: %s); going on.',
                    type(e).__name__, str(e)[:200])
    return None
  if parts is None:
    return None
  needed = total(parts)
  members = len(exp.members) or 1
  what = ', '.join(f'{k} {fmt(v)}' for k, v in parts.items())
  logging.info('Memory: about %s estimated %s (%s)%s; this machine has %s available.',
               fmt(needed), how, what, f' for {members} members' if exp.population else '',
               fmt(available) if available is not None else 'an unknown amount')
  if available is None or needed <= available:
    return needed
  advice = ('Train fewer members at once (population.seeds, population.vary: e.g. two '
            'populations of half the members), a smaller train.batch_size or '
            'train.eval_batch_size, or use a machine with more memory.'
            if exp.population else 'Use a smaller train.batch_size or train.eval_batch_size, '
            'a smaller model, or a machine with more memory.')
  message = (f'this run needs about {fmt(needed)} more host memory ({what}'
             + (f', for {members} members' if exp.population else '')
             + f') and this machine has {fmt(available)} available: the kernel would kill it '
             f'when it runs out, with nothing saved. {advice} The estimate is a floor (XLA\'s '
             f'own memory analysis of the compiled steps); to run anyway, set {OVERRIDE}=1.')
  if os.environ.get(OVERRIDE, '') not in ('', '0'):
    logging.warning('%s (%s=1: running anyway.)', message, OVERRIDE)
    return needed
  raise UserError(message)
