"""Optimizer and learning-rate schedules from the config."""

import optax

from cvjax.errors import UserError


def make_schedule(cfg, base, total_steps):
  """cfg: the config's `schedule` block; `base`: the base learning rate.

  piecewise: multiply by `decay_factor` at each of `boundaries`, given as fractions of the
    run (He et al. 2015: /10 at 32k and 48k of 64k iterations = (0.5, 0.75)), so shortened
    runs keep the paper's shape.
  cosine: cosine decay to 0 over the run.
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
  elif cfg.name == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise UserError(f'unknown schedule.name={cfg.name!r}; expected piecewise, cosine or constant.')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def make_optimizer(cfg, schedule):
  """SGD with momentum; weight decay as an L2 term on every parameter, as in the papers
  (added to the gradient before momentum, like PyTorch's SGD(weight_decay=...))."""
  if cfg.name != 'sgd':
    raise UserError(f'unknown optimizer.name={cfg.name!r}; expected sgd.')
  return optax.chain(
      optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity(),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
