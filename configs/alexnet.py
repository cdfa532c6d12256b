"""AlexNet (Krizhevsky et al. 2012).

  python -m cvjax.main --config=configs/alexnet.py:cifar10 --workdir=runs/alexnet_cifar
  python -m cvjax.summary --models=alexnet,alexnet_1tower

Arg `imagenet` (default) records the paper's recipe: 227x227 crops, batch 128, SGD momentum
0.9, weight decay 5e-4, lr 0.01 divided by 10 three times (the paper divides when the
validation error plateaus; here at epochs 30, 60 and 80), 90 epochs, dropout 0.5, two
towers; the data streams from disk (configs/resnet.py:imagenet_config says how).
Arg `cifar10`: the same net with a 3x3 stride-1 first conv for 32x32 images (see
cvjax/models/alexnet.py), random crops and flips, 30 epochs.
"""

import ml_collections

from configs import resnet


def get_config(arg=None):
  arg = arg or 'imagenet'
  if arg not in ('imagenet', 'cifar10'):
    raise ValueError(f'configs/alexnet.py:{arg}: expected imagenet or cifar10.')
  c = resnet.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name='alexnet', groups=2, activation='relu', dropout_rate=0.5))
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 5e-4
  c.schedule.boundaries = (30 / 90, 60 / 90, 80 / 90)
  if arg == 'imagenet':
    resnet.imagenet_input(c, image_size=227)
    c.train.num_epochs = 90.0
  else:
    c.input.normalization = 'per_channel'
    c.train.num_epochs = 30.0
  return c
