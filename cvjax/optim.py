"""Optimizer and learning-rate schedules from the config."""

import jax
import optax

from cvjax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')
SCHEDULES = ('piecewise', 'cosine', 'polynomial', 'constant')


def make_schedule(cfg, base, total_steps):
  """cfg: the config's `schedule` block; `base`: the base learning rate.

  piecewise: multiply by `decay_factor` at each of `boundaries`, given as fractions of the
    run (He et al. 2015: /10 at 32k and 48k of 64k iterations = (0.5, 0.75)), so shortened
    runs keep the paper's shape.
  cosine: cosine decay to 0 over the run.
  polynomial: (base - end_value) * (1 - t / T) ** power + end_value over the run after the
    warm-up (MLPerf's LARS recipe: power 2).
  constant: the base rate throughout.
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
    main = optax.polynomial_schedule(base, cfg.get('end_value', 0.0), cfg.get('power', 1.0),
                                     rest)
  elif cfg.name == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise UserError(f'unknown schedule.name={cfg.name!r}; expected {", ".join(SCHEDULES)}.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def _name(path):
  key = path[-1]
  return str(getattr(key, 'key', getattr(key, 'name', key)))


def decay_mask(params):
  """True where weight decay applies: kernels of convolutions and dense layers; not the
  BatchNorm scales and biases, nor any layer's bias (torchvision's --norm-weight-decay 0 and
  --bias-weight-decay 0; MLPerf's LARS also leaves them out of the trust ratio)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) not in ('bias', 'scale'),
                                          params)


def make_optimizer(cfg, schedule):
  """cfg: the config's `optimizer` block.

  sgd: SGD with momentum; weight decay as an L2 term added to the gradient before momentum,
    as in the papers and PyTorch's SGD(weight_decay=...).
  adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019), optax.adamw.
  lars: layer-wise trust ratios (You et al. 2017), optax.lars: `trust_coefficient`, momentum.
  lamb: Adam with layer-wise trust ratios (You et al. 2020), optax.lamb.
  `decay_bn_and_bias=False` exempts BatchNorm scales, biases and all biases from weight decay
  (and LARS's from the trust ratio; `decay_mask`); True, the default, decays every parameter
  as the papers did.
  """
  mask = None if cfg.get('decay_bn_and_bias', True) else decay_mask
  wd = cfg.get('weight_decay', 0.0)
  if cfg.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
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
