"""He et al. 2015, Figure 6 and Table 6: plain nets get worse with depth, ResNets better.

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py \
      --workdir=runs/depth
  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py:quick \
      --workdir=runs/depth_quick --only=plain20,plain56,resnet20,resnet56 \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz
  python -m cvjax.tools.report runs/depth

Trials: {plain, residual} x depth {20, 32, 44, 56}, plus ResNet-110, CIFAR-10, the paper's
recipe (64k iterations, lr /10 at 32k and 48k; ResNet-110 warms up for 400 steps).
Arg `quick`: a CPU-sized look, 3 epochs (1,170 steps) with the same schedule shape
(lr /10 at 50% and 75%); on a 2-core CPU that is ~8 min for ResNet-20, ~25 min for ResNet-56.
"""


def get_trials(arg=None):
  quick = arg == 'quick'
  if arg not in (None, 'quick'):
    raise ValueError(f'experiments/depth_ablation.py:{arg}: expected no arg or quick.')
  trials = []
  for residual in (False, True):
    for depth in (20, 32, 44, 56):
      trials.append((f'{"resnet" if residual else "plain"}{depth}',
                     {'model.depth': depth, 'model.residual': residual}))
  trials.append(('resnet110', {'model.depth': 110, 'model.residual': True,
                               'schedule.warmup_steps': 400}))
  if quick:
    for _, overrides in trials:
      overrides['train.num_epochs'] = 3.0
  return trials
