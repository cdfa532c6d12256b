"""CIFAR-10 ResNets and plain nets, the recipe of He et al. 2015, section 4.2; the ImageNet
ResNets of section 3.4 (`imagenet_*`, listed in IMAGENET).

  python -m cvjax.main --config=configs/resnet.py:quick --workdir=runs/quick_cifar
  python -m cvjax.main --config=configs/resnet.py --workdir=runs/resnet20 \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz --config.train.num_epochs=3
  python -m cvjax.main --config=configs/resnet.py:plain56 --workdir=runs/plain56

The arg picks the net: resnetN or plainN for depth N = 6n+2 (default resnet20); `quick`:
ResNet-20 for 5 epochs on the 5,000 CIFAR-10 training images that ship with cvjax (offline; a
look at the code, not a result).
Paper: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k (~164 epochs of 50k images); 4-pixel padding, random 32x32
crops, horizontal flips, per-pixel mean subtraction. Test error: ResNet-20 8.75%,
ResNet-56 6.97%, ResNet-110 6.43%. ResNet-110 warms up at lr 0.01 (here: linear warm-up
over the first 400 steps).

Measured (README, docs/results; 2-core CPUs):
  quick: 5 epochs, 2 min 45 s cold, 60.4% test error (AMD EPYC Zen 5, shared).
  resnet20 for 3 epochs (num_epochs=3, the CIFAR-10 JPEG copy): 31.34% test error, ~13 min;
  plain20 the same: 37.67%, ~7 min (2-core CPU, 2026-11-25). One CIFAR-10 epoch of resnet20:
  610-629 img/s (Intel Xeon Sapphire Rapids, 2 cores, 2026-11-26; docs/performance.md).
  The paper's full schedule (164 epochs): not yet measured.
"""

import re

from ml_collections import config_dict

from configs import common

# ImageNet args: imagenet (ResNet-50), imagenet_{resnet,plain}{18,34,50,101,152}, and
# imagenet_{resnet,plain}{50,101,152}_v1.5 (torchvision's bottleneck: the stride in the 3x3
# conv; the nets whose published weights `python -m cvjax.import_weights` reads).
IMAGENET = {'imagenet': ('resnet', 50, '1x1')}
IMAGENET.update({f'imagenet_{kind}{depth}': (kind, depth, '1x1')
                 for kind in ('resnet', 'plain') for depth in (18, 34, 50, 101, 152)})
IMAGENET.update({f'imagenet_{kind}{depth}_v1.5': (kind, depth, '3x3')
                 for kind in ('resnet', 'plain') for depth in (50, 101, 152)})


def get_config(arg=None):
  arg = arg or 'resnet20'
  if arg in IMAGENET:
    return imagenet_config(*IMAGENET[arg])
  if arg == 'quick':
    c = get_config('resnet20')
    c.dataset.name = 'cifar10_6k'  # 5,000 train / 1,000 test, in cvjax/data/embedded.
    c.train.num_epochs = 5.0  # 195 steps of 128.
    c.train.log_every_steps = 39  # Once per epoch.
    return c
  match = re.fullmatch(r'(resnet|plain)(\d+)', arg)
  if not match:
    raise ValueError(f'configs/resnet.py:{arg}: expected resnetN, plainN (e.g. resnet56), '
                     f'quick, or one of {", ".join(IMAGENET)}.')
  c = common.base_config()  # Its dataset, input, optimizer and schedule are this recipe's.
  c.model.name = 'resnet_cifar'
  c.model.depth = int(match.group(2))  # 6n+2: 20, 32, 44, 56, 110, 1202.
  c.model.residual = match.group(1) == 'resnet'  # False: the plain twin.
  c.model.activation = 'relu'  # relu | tanh | sigmoid.
  c.model.batch_norm = True
  c.model.bn_momentum = 0.9  # Flax convention (keeps 90% of the old average): PyTorch's 0.1.
  c.model.zero_init_residual = False  # Not in the paper; off keeps plain vs residual fair.
  # nn.scan compiles each stage's repeated blocks once. Unset: on above depth 110, decided
  # when the model is built (so --config.model.depth=1202 gets it too): unscanned, ResNet-1202
  # takes minutes to compile and smaller nets run faster (docs/performance.md).
  c.model.scan_blocks = config_dict.placeholder(bool)
  c.schedule.warmup_steps = 400 if c.model.depth >= 110 else 0
  c.train.num_epochs = 164.0  # 64k steps of 128 from 50k images.
  # Re-compute each block's activations in backward (CIFAR ResNets only). Unset: on above
  # depth 110, where it cuts ResNet-1202's memory and step time; for unscanned nets it only
  # costs time (docs/performance.md).
  c.train.remat = config_dict.placeholder(bool)
  return c


def imagenet_config(kind, depth, stride_in_bottleneck):
  """He et al. 2015, section 3.4: batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1
  divided by 10 at epochs 30 and 60, 90 epochs (the paper divides on plateaus, ~60e4
  iterations); 224x224 random-resized crops and flips, ImageNet's per-channel mean and std;
  evaluation on the centre 224 of the image resized to 256 (`eval.crops=10`: the paper's
  10-crop testing). The data streams from disk (cvjax/data/streaming.py):

    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet18 --workdir=runs/r18 \
        --config.dataset.path=/data/imagenet   # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet50 --workdir=runs/r50 \
        --config.dataset.data_dir=~/tensorflow_datasets   # tfds imagenet2012

  Measured: a 6-step smoke test of imagenet_resnet18 on a 10-class ImageNet-like folder at
  batch 16, 24 s per step (Intel Xeon Sapphire Rapids, 2 cores, 2026-11-26; docs/results); a
  full run: not yet measured.
  """
  c = common.base_config()
  common.imagenet_input(c)
  c.model.name = 'resnet'
  c.model.depth = depth  # 18, 34, 50, 101, 152.
  c.model.residual = kind == 'resnet'  # False: the plain twin.
  c.model.activation = 'relu'
  c.model.bn_momentum = 0.9  # Flax convention: PyTorch's 0.1.
  c.model.zero_init_residual = False
  # Where bottlenecks (50/101/152) downsample: '1x1' the paper (v1), '3x3' torchvision (v1.5).
  c.model.stride_in_bottleneck = stride_in_bottleneck
  c.train.batch_size = 256
  c.train.num_epochs = 90.0
  c.schedule.boundaries = (30 / 90, 60 / 90)
  return c
