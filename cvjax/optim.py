"""Optimizer and learning-rate schedules from the config."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cvjax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')
SCHEDULES = ('piecewise', 'cosine', 'polynomial', 'constant', 'triangular')


def make_schedule(cfg, base, total_steps):
  """cfg: the config's `schedule` block; `base`: the base learning rate.

  piecewise: multiply by `decay_factor` at each of `boundaries`, given as fractions of the
    run (He et al. 2015: /10 at 32k and 48k of 64k iterations = (0.5, 0.75)), so shortened
    runs keep the paper's shape.
  cosine: cosine decay to 0 over the run.
  polynomial: (base - end_value) * (1 - t / T) ** power + end_value over the run after the
    warm-up (MLPerf's LARS recipe: power 2).
  constant: the base rate throughout.
  triangular: airbench94's: linear from `triangle_start` x base at step 0 to base at
    `triangle_peak` of the run, then linear to `triangle_end` x base at the last step
    (airbench94: 0.2, 0.23, 0.07; its peak step is int(0.23 * total)).
  Any of them may start with `warmup_steps` of linear warm-up from 0.
  """
  warmup = min(cfg.warmup_steps, total_steps)
  rest = max(total_steps - warmup, 1)
  if cfg.name == 'piecewise':
    boundaries = {max(int(round(f * total_steps)) - warmup, 0): cfg.decay_factor
                  for f in cfg.boundaries}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif cfg.name == 'cosine':
    main = optax.cosine_decay_schedule(base, rest)
  elif cfg.name == 'polynomial':
    main = optax.polynomial_schedule(base, cfg.end_value, cfg.power,
                                     rest)
  elif cfg.name == 'constant':
    main = optax.constant_schedule(base)
  elif cfg.name == 'triangular':
    main = triangular_schedule(base, rest, cfg.triangle_start, cfg.triangle_peak,
                               cfg.triangle_end)
  else:
    raise UserError(f'unknown schedule.name={cfg.name!r}; expected {", ".join(SCHEDULES)}.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def triangular_schedule(base, total_steps, start, peak, end):
  """base x (`start` -> 1 -> `end`), piecewise linear in the step, peaking at step
  int(peak * total_steps) and reaching `end` at `total_steps`."""
  top = max(int(peak * total_steps), 1)
  xs = jnp.array([0.0, top, max(total_steps, top + 1)], jnp.float32)
  ys = base * jnp.array([start, 1.0, end], jnp.float32)
  return lambda step: jnp.interp(jnp.asarray(step, jnp.float32), xs, ys)


def _name(path):
  key = path[-1]
  return str(getattr(key, 'key', getattr(key, 'name', key)))


def decay_mask(params):
  """True where weight decay applies: kernels of convolutions and dense layers; not the
  BatchNorm scales and biases, nor any layer's bias (torchvision's --norm-weight-decay 0 and
  --bias-weight-decay 0; MLPerf's LARS also leaves them out of the trust ratio)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) not in ('bias', 'scale'),
                                          params)


def _is_bn_bias(path):
  return _name(path) == 'bias' and len(path) > 1 and _name(path[:-1]).startswith('BatchNorm')


def scale_bn_bias_grads(factor):
  """Multiplies the gradients of BatchNorm biases by `factor` before the weight decay is added:
  with SGD that is `factor` x the learning rate and 1 / `factor` x the weight decay on them, the
  decay's product with the rate unchanged (airbench94's bias_scaler, 64)."""
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _is_bn_bias(p), params)
  return optax.masked(optax.scale(factor), labels)


def freeze_after(step, name):
  """Zero updates from `step` on for the parameters named `name` (airbench94 trains the
  whitening conv's bias for 3 of its 9.9 epochs, then freezes it)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    live = state.count < step
    updates = jax.tree_util.tree_map_with_path(
        lambda p, u: jnp.where(live, u, jnp.zeros_like(u)) if _name(p) == name else u, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(init, update)


class LookaheadState(NamedTuple):
  count: jax.Array
  slow: optax.Params  # The averaged ("slow") weights.


def lookahead(every, decay, total_steps):
  """airbench94's Lookahead, as the last transformation of the chain: every `every` steps the
  average moves towards the new weights, slow = d * slow + (1 - d) * new with
  d = `decay` * (step / total_steps) ** 3, and the weights are set to it; at the last step they
  are set to the average. Unlike cvjax's EMA (train.ema_decay, evaluated beside the weights) it
  pulls the trained weights back each time. BatchNorm statistics are not averaged here
  (airbench's are, with the weights)."""
  def init(params):
    return LookaheadState(count=jnp.zeros((), jnp.int32), slow=params)

  def update(updates, state, params):
    if params is None:
      raise ValueError('lookahead needs the parameters (tx.update(grads, state, params)).')
    count = state.count + 1
    d = decay * (count.astype(jnp.float32) / total_steps) ** 3
    sync = count % every == 0
    last = count >= total_steps
    new = optax.apply_updates(params, updates)
    slow = jax.tree.map(lambda s, n: jnp.where(sync, d * s + (1 - d) * n, s).astype(s.dtype),
                        state.slow, new)
    updates = jax.tree.map(lambda u, p, s: jnp.where(sync | last, s - p, u).astype(u.dtype),
                           updates, params, slow)
    return updates, LookaheadState(count=count, slow=slow)
  return optax.GradientTransformation(init, update)


def make_optimizer(cfg, schedule, total_steps=None):
  """cfg: the config's `optimizer` block.

  sgd: SGD with momentum; weight decay as an L2 term added to the gradient before momentum,
    as in the papers and PyTorch's SGD(weight_decay=...).
  adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019), optax.adamw.
  lars: layer-wise trust ratios (You et al. 2017), optax.lars: `trust_coefficient`, momentum.
  lamb: Adam with layer-wise trust ratios (You et al. 2020), optax.lamb.
  `decay_bn_and_bias=False` exempts BatchNorm scales, biases and all biases from weight decay
  (and LARS's from the trust ratio; `decay_mask`); True, the default, decays every parameter
  as the papers did.
  sgd also takes airbench94's pieces (all off by default): `bn_bias_lr_scale`
  (`scale_bn_bias_grads`), `whiten_bias_frozen_at` (a fraction of the `total_steps` run;
  `freeze_after`) and `lookahead_every` / `lookahead_decay` (`lookahead`).
  """
  mask = None if cfg.decay_bn_and_bias else decay_mask
  wd = cfg.weight_decay
  if cfg.name == 'sgd':
    parts = [optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
             optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)]
    if cfg.bn_bias_lr_scale != 1:
      parts.insert(0, scale_bn_bias_grads(cfg.bn_bias_lr_scale))
    if cfg.whiten_bias_frozen_at < 1 or cfg.lookahead_every:
      if total_steps is None:
        raise ValueError('optimizer.whiten_bias_frozen_at and lookahead_every need total_steps.')
    if cfg.whiten_bias_frozen_at < 1:
      parts.append(freeze_after(int(cfg.whiten_bias_frozen_at * total_steps), 'whiten_bias'))
    if cfg.lookahead_every:
      parts.append(lookahead(cfg.lookahead_every, cfg.lookahead_decay, total_steps))
    return optax.chain(*parts)
  if cfg.name == 'adamw':
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                       mask=mask)
  if cfg.name == 'lamb':
    return optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)
  if cfg.name == 'lars':
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask or True,
                      trust_coefficient=cfg.trust_coefficient, trust_ratio_mask=mask or True, momentum=cfg.momentum,
                      nesterov=cfg.nesterov)
  raise UserError(f'unknown optimizer.name={cfg.name!r}; expected {", ".join(OPTIMIZERS)}.')
