"""What the training log says while a run trains: its speed (`Chrono`) and the progress line
of one run or of a population's members."""

import contextlib
import time

from cvjax import population


class Chrono:
  """Training speed over each log interval: images per second, the fraction of the time the
  steps waited on the input, and the time left. Compilation (before `start`) and the time
  `paused` (evaluation, checkpoints) are left out, so the rate is the steps' own."""

  def __init__(self, total_steps, images_per_step):
    self.total_steps, self.images_per_step = total_steps, images_per_step
    self._since, self._step, self._paused, self._waited = None, 0, 0.0, 0.0

  @property
  def started(self):
    return self._since is not None

  def start(self, step):
    """Starts the clock at `step` (after the first call, which compiled the step)."""
    self._since, self._step, self._waited = time.perf_counter(), step, 0.0

  @contextlib.contextmanager
  def waiting_for_input(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._waited += time.perf_counter() - t0

  @contextlib.contextmanager
  def paused(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t0

  def lap(self, step):
    """(images/s, input wait fraction, seconds left) since the last lap, at `step`."""
    now = time.perf_counter()
    elapsed = now - self._since - self._paused
    rate = (step - self._step) * self.images_per_step / elapsed if step > self._step else 0.0
    wait = self._waited / elapsed if elapsed > 0 else 0.0
    left = (self.total_steps - step) * self.images_per_step / rate if rate else 0.0
    self._since, self._step, self._paused, self._waited = now, step, 0.0, 0.0
    return rate, wait, left


def fmt_time(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def metrics_text(logged, split, groups=None):
  """'loss 0.4321  error 12.34%' of one run; of a population, each net (`groups`: {label:
  [member names]}, population.by_group) on its own as 'mean ± std' over its seeds, e.g.
  'residualFalse: loss 0.43 ± 0.01  error 12.3 ± 0.5% (2 seeds) | residualTrue: ...'."""
  groups = groups if groups and len(logged) > 1 else {'': list(logged)}
  texts = []
  for label, names in groups.items():
    parts = []
    for key, fmt, scale, unit in (('loss', '.4f', 1, ''), ('error', '.2f', 100, '%'),
                                  ('top5_error', '.2f', 100, '%'),
                                  ('ema_error', '.2f', 100, '%')):
      values = [logged[n][f'{split}/{key}'] * scale for n in names if f'{split}/{key}' in logged[n]]
      if not values:
        continue
      name = {'top5_error': 'top-5 error', 'ema_error': 'EMA error'}.get(key, key)
      mean, std = population.mean_std(values)
      parts.append(f'{name} {mean:{fmt}}{unit}' if len(values) == 1 else
                   f'{name} {mean:{fmt}} ± {std:{fmt}}{unit}')
    text = '  '.join(parts) + (f' ({len(names)} seeds)' if len(names) > 1 else '')
    texts.append(f'{label}: {text}' if len(groups) > 1 else text)
  return ' | '.join(texts)
