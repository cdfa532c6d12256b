"""The airbench paper's ablations (Jordan 2024, arXiv 2404.00498): airbench94 with each of its
techniques turned off in turn, test error over seeds.

  python -m cvjax.sweep --config=configs/speedrun.py --sweep=experiments/speedrun_ablation.py \
      --workdir=runs/speedrun_ablation --config.dataset.path=/path/to/your/cifar10-jpeg.tar.gz
  python -m cvjax.sweep --config=configs/speedrun.py \
      --sweep=experiments/speedrun_ablation.py:quick --workdir=runs/speedrun_ablation_quick
  python -m cvjax.tools.report runs/speedrun_ablation

Trials: `full` (the recipe) and one per entry of configs/speedrun.py's ABLATIONS (no_whiten,
no_dirac, no_bias_scale, no_lookahead, no_smoothing, random_flip, no_translate, no_tta, relu),
each a population of 5 seeds (`population.seeds`). The report gives each trial's test error as
mean ± std over its seeds. Args (comma-separated): `quick`: 3 seeds on the 5,000 CIFAR-10
images that ship with cvjax, batch 256 for 10 epochs (configs/speedrun.py:quick), a look at
the code rather than a result; `seeds=N`: N seeds per trial.
On a 2-core CPU one member of the full recipe is ~0.36 PFLOP (docs/speedrun.md): run the
trials one at a time (`--only=full,no_lookahead`) and expect hours per trial.
"""

from configs import speedrun


def get_trials(arg=None):
  args = [a for a in (arg or '').split(',') if a]
  seeds = 5
  for a in args:
    if a.startswith('seeds='):
      seeds = int(a[len('seeds='):])
    elif a != 'quick':
      raise ValueError(f'experiments/speedrun_ablation.py:{arg}: expected quick and/or seeds=N.')
  quick = 'quick' in args
  if quick and not any(a.startswith('seeds=') for a in args):
    seeds = 3
  base = {'population.seeds': seeds}
  if quick:  # configs/speedrun.py:quick, as overrides of the full recipe.
    base.update({'dataset.name': 'cifar10_6k', 'train.batch_size': 256,
                 'optimizer.learning_rate': speedrun.get_config('quick').optimizer.learning_rate,
                 'train.num_epochs': 10.0, 'train.eval_every_steps': 0})
  trials = [('full', dict(base))]
  trials += [(name, {**base, **overrides}) for name, overrides in speedrun.ABLATIONS.items()]
  return trials
