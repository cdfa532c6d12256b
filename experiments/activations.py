"""Vanishing gradients: plain nets without BatchNorm, sigmoid vs tanh vs ReLU, by depth.

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/activations.py \
      --workdir=runs/activations --config.dataset.path=cifar10.tar.gz
  python -m cvjax.tools.report runs/activations

Plain CIFAR nets (no shortcuts, no BatchNorm, He-normal init) of depth 8, 20 and 44 with each
activation, logging the gradient norm of every layer (`grad_norm/<layer>`) every 20 steps.
Each trial is a population of 3 seeds; the report draws each net's mean with a band over its
seeds. Short by design (300 steps at lr 0.01): the question is how the gradient reaches the
first layers at the start of training, not the final accuracy.
Args (comma-separated): `quick`: 100 steps; `single`: one run per net (seed 0), as before
populations.
"""


def get_trials(arg=None):
  args = set(arg.split(',')) if arg else set()
  if args - {'quick', 'single'}:
    raise ValueError(f'experiments/activations.py:{arg}: expected no arg, or quick, single '
                     'or single,quick.')
  steps = 100 if 'quick' in args else 300
  trials = []
  for activation in ('sigmoid', 'tanh', 'relu'):
    for depth in (8, 20, 44):
      overrides = {
          'model.depth': depth, 'model.residual': False, 'model.batch_norm': False,
          'model.activation': activation, 'optimizer.learning_rate': 0.01,
          'schedule.name': 'constant', 'train.num_steps': steps,
          'train.grad_norm_every_steps': 20, 'train.log_every_steps': 20,
          'train.eval_every_steps': steps}
      if 'single' not in args:
        overrides['population.seeds'] = 3
      trials.append((f'{activation}{depth}', overrides))
  return trials
