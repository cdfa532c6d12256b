"""VGG A, B, D, E = VGG-11/13/16/19 (Simonyan & Zisserman 2014).

  python -m cvjax.main --config=configs/vgg.py:cifar10_vgg16 --workdir=runs/vgg16_cifar
  python -m cvjax.tools.summary --models=vgg11,vgg13,vgg16,vgg19

Arg `imagenet_vggN` (default VGG-16; `imagenet_vggN_bn` with BatchNorm, as torchvision's
`vggN_bn`) records the paper's recipe: 224x224 crops, batch 256,
SGD momentum 0.9, weight decay 5e-4, dropout 0.5 in the first two dense layers, lr 0.01
divided by 10 three times (the paper divides on validation plateaus; here at 40%, 70% and
90% of the run), 74 epochs; the data streams from disk (configs/resnet.py:imagenet_config
says how). Arg `cifar10_vggN`: the same net with BatchNorm on 32x32 images (five pools leave
1x1x512), lr 0.05, 60 epochs.

Measured: a 4-step smoke test of imagenet_vgg11 on a 10-class ImageNet-like folder at batch 16,
76 s per step (Intel Xeon Sapphire Rapids, 2 cores, 2026-11-26; docs/results); a full run of
any arg: not yet measured.
"""

from configs import common

DEPTHS = (11, 13, 16, 19)  # Configurations A, B, D, E.
# arg -> (ImageNet?, depth, BatchNorm?); `imagenet` and `cifar10` are VGG-16.
ARGS = {'imagenet': (True, 16, False), 'cifar10': (False, 16, True)}
ARGS.update({f'imagenet_vgg{d}{bn}': (True, d, bool(bn)) for d in DEPTHS for bn in ('', '_bn')})
ARGS.update({f'cifar10_vgg{d}': (False, d, True) for d in DEPTHS})


def get_config(arg=None):
  if (arg or 'imagenet') not in ARGS:
    raise ValueError(f'configs/vgg.py:{arg}: expected one of {", ".join(ARGS)}.')
  imagenet, depth, batch_norm = ARGS[arg or 'imagenet']
  c = common.base_config()
  c.model.name = 'vgg'  # The builder in cvjax/models.
  c.model.depth = depth  # 11, 13, 16, 19: configurations A, B, D, E.
  c.model.batch_norm = batch_norm  # The paper has none; _bn args and CIFAR add it.
  c.model.activation = 'relu'  # The paper's ReLU.
  c.model.dropout_rate = 0.5  # In the first two dense layers.
  c.model.bn_momentum = 0.9  # Flax convention: PyTorch's 0.1.
  c.optimizer.weight_decay = 5e-4  # The paper's.
  c.schedule.boundaries = (0.4, 0.7, 0.9)
  if imagenet:
    common.imagenet_input(c)
    c.optimizer.learning_rate = 0.01  # The paper's.
    c.train.batch_size = 256  # The paper's.
    c.train.num_epochs = 74.0  # The paper's 74 epochs.
  else:
    c.input.normalization = 'per_channel'
    c.optimizer.learning_rate = 0.05  # CIFAR-10 with BatchNorm: not from the paper.
    c.train.num_epochs = 60.0  # CIFAR-10: not from the paper.
  return c
