"""AlexNet (Krizhevsky et al. 2012).

  python -m cvjax.main --config=configs/alexnet.py:cifar10 --workdir=runs/alexnet_cifar
  python -m cvjax.tools.summary --models=alexnet,alexnet_1tower

Arg `imagenet` (default) records the paper's recipe: 227x227 crops, batch 128, SGD momentum
0.9, weight decay 5e-4, lr 0.01 divided by 10 three times (the paper divides when the
validation error plateaus; here at epochs 30, 60 and 80), 90 epochs, dropout 0.5, two
towers; the data streams from disk (configs/resnet.py:imagenet_config says how).
Arg `imagenet_torchvision`: the same recipe for torchvision's one-tower AlexNet
(`model.variant='torchvision'`: 64-192-384-256-256 channels, no LRN, an adaptive 6x6 pool,
224x224 crops), the net whose published weights `python -m cvjax.import_weights --model=alexnet`
reads. Arg `cifar10`: the paper's net with a 3x3 stride-1 first conv for 32x32 images (see
cvjax/models/alexnet.py), random crops and flips, 30 epochs.

Measured: not yet measured (no run of any arg).
"""

from configs import common


def get_config(arg=None):
  arg = arg or 'imagenet'
  if arg not in ('imagenet', 'imagenet_torchvision', 'cifar10'):
    raise ValueError(f'configs/alexnet.py:{arg}: expected imagenet, imagenet_torchvision or '
                     'cifar10.')
  c = common.base_config()
  torchvision = arg == 'imagenet_torchvision'
  c.model.name = 'alexnet'  # The builder in cvjax/models.
  c.model.variant = 'torchvision' if torchvision else 'paper'  # paper | torchvision.
  c.model.groups = 1 if torchvision else 2  # Towers: 2 in the paper.
  c.model.activation = 'relu'  # The paper's ReLU.
  c.model.dropout_rate = 0.5  # In the first two dense layers.
  c.optimizer.learning_rate = 0.01  # The paper's, divided by 10 at each boundary.
  c.optimizer.weight_decay = 5e-4  # The paper's.
  c.schedule.boundaries = (30 / 90, 60 / 90, 80 / 90)  # Epochs 30, 60 and 80 of 90.
  if arg.startswith('imagenet'):
    common.imagenet_input(c, image_size=224 if torchvision else 227)
    c.train.num_epochs = 90.0  # About the paper's 90 passes over ImageNet.
  else:
    c.input.normalization = 'per_channel'
    c.train.num_epochs = 30.0  # CIFAR-10: not in the paper.
  return c
