"""He et al. 2015, Figure 6 and Table 6: plain nets get worse with depth, ResNets better.

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py \
      --workdir=runs/depth
  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py:quick \
      --workdir=runs/depth_quick --only=depth20,depth56 \
      --config.dataset.path=cifar10.tar.gz
  python -m cvjax.tools.report runs/depth

Trials: one population per depth 20, 32, 44, 56, its members the plain and the residual net
x 5 seeds (`population.vary`, `population.seeds`), plus ResNet-110 x 5 seeds; CIFAR-10, the
paper's recipe (64k iterations, lr /10 at 32k and 48k; ResNet-110 warms up for 400 steps).
The report gives each net's test error as mean ± std over its seeds, and the best.
`cpu`: the chapter for an afternoon on a CPU, offline (the 5,000 training and 1,000 test
CIFAR-10 images that ship with cvjax):

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py:cpu \
      --workdir=runs/depth_cpu
  python -m cvjax.tools.report runs/depth_cpu      # Table 6 and Figure 6 over the 2 seeds

Two populations, depth 20 and depth 56, each the plain and the residual net x 2 seeds, 300
steps of 32 images at lr 0.05 (/10 at 50% and 75%), tested every 100 steps. What 300 steps
can show: the degradation problem (plain-56 trains and tests worse than plain-20) and the
shortcuts fixing it at equal depth (ResNet-56 better than plain-56). What they cannot: deeper
ResNets better than shallower ones (ResNet-56 below ResNet-20, 6.97% against 8.75% in the
paper) needs the full schedule (the default, 164 epochs); at 300 steps ResNet-56 is still
behind ResNet-20. The same budget on the full CIFAR-10 gave plain-20 67.9%, plain-56 88.3%,
ResNet-20 63.6%, ResNet-56 78.8% test error (2 seeds; every plain-56 seed worse than every
plain-20 seed). Measured (AMD EPYC Zen 4, 2 cores, 2026-12-07): 10 min 44 s for both
populations; test error plain-20 68.15 ± 5.44%, plain-56 87.60 ± 0.85%, ResNet-20 60.40 ± 2.26%,
ResNet-56 83.25 ± 7.00% (2 seeds each): plain-56 far worse than plain-20, ResNet-20 better
than plain-20 on every seed; at depth 56 the shortcuts' gain (4.4 points) is within ResNet-56's
seed spread at 300 steps (one seed at 78.3%). A shorter or longer look: add e.g.
--config.train.num_steps=600 (the command line wins over the sweep file).
Args (comma-separated): `quick`, a CPU-sized look: 3 seeds, 3 epochs (1,170 steps) with the
same schedule shape (lr /10 at 50% and 75%); `single`: one run per net and seed 0 (trials
plain20 ... resnet56, resnet110), as before populations; `single,quick`: those for 3 epochs,
on a 2-core CPU ~8 min for ResNet-20, ~25 min for ResNet-56. The quick populations on a
2-core CPU: depth20 (6 members) ~47 min; depth56's six members need more than 24 GiB of host
memory there (~4-7 GB a member), so docs/results runs its plain and residual nets as two
populations of 3 (`--config.model.residual=False|True --config.population.seeds=3`).
"""


# `cpu`: the chapter a 2-core CPU finishes in about a quarter of an hour (see the docstring).
CPU_STEPS = 300  # He et al.'s schedule shape (lr /10 at 50% and 75%) over 300 steps.
CPU = {'dataset.name': 'cifar10_6k', 'train.batch_size': 32, 'optimizer.learning_rate': 0.05,
       'train.num_steps': CPU_STEPS, 'train.log_every_steps': 50,
       'train.eval_every_steps': 100, 'train.checkpoint_every_steps': 100,
       'population.seeds': 2, 'population.vary': 'model.residual=False,True'}


def get_trials(arg=None):
  args = set(arg.split(',')) if arg else set()
  if args == {'cpu'}:
    return [(f'depth{depth}', {'model.depth': depth, **CPU}) for depth in (20, 56)]
  if args - {'quick', 'single'}:
    raise ValueError(f'experiments/depth_ablation.py:{arg}: expected no arg, or cpu, quick, '
                     'single or single,quick.')
  quick = 'quick' in args
  seeds = {} if 'single' in args else {'population.seeds': 3 if quick else 5}
  if 'single' in args:
    trials = [(f'{"resnet" if residual else "plain"}{depth}',
               {'model.depth': depth, 'model.residual': residual})
              for residual in (False, True) for depth in (20, 32, 44, 56)]
  else:
    trials = [(f'depth{depth}', {'model.depth': depth, **seeds,
                                 'population.vary': 'model.residual=False,True'})
              for depth in (20, 32, 44, 56)]
  trials.append(('resnet110', {'model.depth': 110, 'model.residual': True,
                               'schedule.warmup_steps': 400, **seeds}))
  if quick:
    for _, overrides in trials:
      overrides['train.num_epochs'] = 3.0
  return trials
