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
"""

import re

import ml_collections

from configs import resnet


def get_config(arg=None):
  match = re.fullmatch(r'(imagenet|cifar10)(?:_vgg(\d+))?(_bn)?', arg or 'imagenet')
  if not match:
    raise ValueError(f'configs/vgg.py:{arg}: expected imagenet_vggN[_bn] or cifar10_vggN.')
  imagenet = match.group(1) == 'imagenet'
  c = resnet.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name='vgg', depth=int(match.group(2) or 16), batch_norm=not imagenet or bool(match.group(3)),
      activation='relu',
      dropout_rate=0.5, bn_momentum=0.9))
  c.optimizer.weight_decay = 5e-4
  c.schedule.boundaries = (0.4, 0.7, 0.9)
  if imagenet:
    resnet.imagenet_input(c)
    c.optimizer.learning_rate = 0.01
    c.train.batch_size = 256
    c.train.num_epochs = 74.0
  else:
    c.input.normalization = 'per_channel'
    c.optimizer.learning_rate = 0.05
    c.train.num_epochs = 60.0
  return c
