"""CIFAR-10 ResNets and plain nets, the recipe of He et al. 2015, section 4.2.

  python -m cvjax.main --config=configs/resnet.py --workdir=runs/resnet20
  python -m cvjax.main --config=configs/resnet.py:quick --workdir=runs/quick_cifar
  python -m cvjax.main --config=configs/resnet.py:plain56 --workdir=runs/plain56
  python -m cvjax.main --config=configs/resnet.py --workdir=runs/r20 \
      --config.dataset.path=../shared/data/cifar10-jpeg.tar.gz --config.train.num_epochs=3

The arg picks the net: resnetN or plainN for depth N = 6n+2 (default resnet20); `quick`:
ResNet-20 for 5 epochs on the 5,000 CIFAR-10 training images that ship with cvjax (offline;
minutes on a CPU, far from the paper's error: a look at the code, not a result).
Paper: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k (~164 epochs of 50k images); 4-pixel padding, random 32x32
crops, horizontal flips, per-pixel mean subtraction. Test error: ResNet-20 8.75%,
ResNet-56 6.97%, ResNet-110 6.43%. ResNet-110 warms up at lr 0.01 (here: linear warm-up
over the first 400 steps). Full runs are GPU-sized; on a 2-core CPU, ResNet-20 runs a few
hundred images per second.
"""

import re

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  if arg and arg.startswith('imagenet'):
    return imagenet_config(arg)
  if arg == 'quick':
    c = get_config('resnet20')
    c.dataset.name = 'cifar10_6k'  # 5,000 train / 1,000 test, in cvjax/data/embedded.
    c.train.num_epochs = 5.0  # 195 steps of 128.
    c.train.log_every_steps = 39  # Once per epoch.
    return c
  match = re.fullmatch(r'(resnet|plain)(\d+)', arg or 'resnet20')
  if not match:
    raise ValueError(f'configs/resnet.py:{arg}: expected resnetN, plainN (e.g. resnet56), '
                     'quick or imagenet[_resnetN|_plainN].')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'cifar10'  # A tfds name.
  c.dataset.data_dir = ''  # tfds data_dir ('' = tfds default).
  c.dataset.path = ''  # Local raw files instead of tfds: IDX folder or image folder/.tar.gz.
  c.dataset.download = True  # Let tfds download when the data is not in data_dir.
  # memory: the whole dataset on the device; streaming: decoded and augmented by host
  # workers from disk (ImageNet); auto: streaming for imagenet* and large image folders.
  c.dataset.pipeline = 'auto'

  c.input = ml_collections.ConfigDict()
  c.input.image_size = 0  # Zero-pad images to this size (0: keep as is).
  c.input.normalization = 'per_pixel_mean'  # per_pixel_mean | per_channel | imagenet | none.
  c.input.crop_padding = 4  # Random crops from images zero-padded by this (0: off).
  c.input.flip = True  # Random horizontal flips.
  # Streaming input only: Inception-style random-resized crops to image_size, decoded by
  # this many grain worker processes (0: threads of the training process; -1: one per
  # CPU core but one, at most 16).
  c.input.random_crop_area = (0.08, 1.0)  # Fraction of the image's area.
  c.input.random_crop_aspect = (3 / 4, 4 / 3)  # Width / height, sampled log-uniformly.
  c.input.workers = 0
  c.input.threads = 2  # Reading threads per process.

  c.eval = ml_collections.ConfigDict()
  c.eval.crops = 1  # 1: the centre crop; 10: corners, centre and their flips, logits averaged.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet_cifar'
  c.model.depth = int(match.group(2))  # 6n+2: 20, 32, 44, 56, 110, 1202.
  c.model.residual = match.group(1) == 'resnet'  # False: the plain twin.
  c.model.activation = 'relu'  # relu | tanh | sigmoid.
  c.model.batch_norm = True
  c.model.bn_momentum = 0.9  # Flax convention (keeps 90% of the old average): PyTorch's 0.1.
  c.model.zero_init_residual = False  # Not in the paper; off keeps plain vs residual fair.
  # nn.scan compiles each stage's repeated blocks once. Unset: on above depth 110, decided
  # when the model is built (so --config.model.depth=1202 gets it too). Up to ResNet-110
  # the unscanned step compiles in < 10 s and runs 1.3-1.5x faster on XLA:CPU; ResNet-1202
  # unscanned did not finish compiling in 12 minutes, scanned it compiles in 4-20 s (docs/performance.md).
  c.model.scan_blocks = config_dict.placeholder(bool)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'piecewise'  # piecewise | cosine | constant.
  c.schedule.boundaries = (0.5, 0.75)  # Fractions of the run: 32k and 48k of 64k steps.
  c.schedule.decay_factor = 0.1
  c.schedule.warmup_steps = 400 if c.model.depth >= 110 else 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 164.0  # 64k steps of 128 from 50k images.
  c.train.num_steps = config_dict.placeholder(int)  # Wins over num_epochs when set.
  c.train.eval_batch_size = 1000
  c.train.eval_every_steps = 0  # 0: once per epoch.
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2000
  c.train.keep_checkpoints = 3
  c.train.compute_dtype = 'float32'  # float32 | bfloat16 (params stay float32).
  # Forward and backward as two XLA programs: ~1.2x faster on CPU (docs/performance.md); the
  # one-program step (False) is the plain jax.grad step.
  c.train.split_backward = True
  # Re-compute each block's activations in backward. Unset: on for CIFAR ResNets above
  # depth 110, where it cuts ResNet-1202's memory ~5x and its step time too; for
  # unscanned nets it only costs time (docs/performance.md).
  c.train.remat = config_dict.placeholder(bool)
  c.train.grad_norm_every_steps = 0  # Log per-layer gradient norms every N steps (0: off).
  # Skip updates whose loss or gradients are not finite (counted as train/skipped_nonfinite)
  # instead of stopping the run at the first one.
  c.train.skip_nonfinite = False
  # float32 convolutions on oneDNN on CPU (cvjax.ops.onednn; docs/performance.md). False, or
  # CVJAX_NATIVE=0, keeps XLA's own convolutions.
  c.train.native_conv = True
  return c


def imagenet_config(arg):
  """`imagenet`, `imagenet_resnet18`, `imagenet_plain34`, ... (default ResNet-50);
  `imagenet_resnet50_v1.5`: torchvision's bottleneck (stride in the 3x3 conv), the net whose
  published weights `python -m cvjax.import_weights --model=resnet50` reads.

  He et al. 2015, section 3.4: batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1
  divided by 10 at epochs 30 and 60, 90 epochs (the paper divides on plateaus, ~60e4
  iterations); 224x224 random-resized crops and flips, ImageNet's per-channel mean and std;
  evaluation on the centre 224 of the image resized to 256 (`eval.crops=10`: the paper's
  10-crop testing). The data streams from disk (cvjax/data/streaming.py):

    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet18 --workdir=runs/r18 \
        --config.dataset.path=/data/imagenet   # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet50 --workdir=runs/r50 \
        --config.dataset.data_dir=~/tensorflow_datasets   # tfds imagenet2012
  """
  match = re.fullmatch(r'imagenet(?:_(resnet|plain)(\d+))?(_v1\.5)?', arg)
  if not match:
    raise ValueError(f'configs/resnet.py:{arg}: expected imagenet, imagenet_resnetN or '
                     'imagenet_resnetN_v1.5.')
  c = get_config('resnet20')
  imagenet_input(c)
  c.model.name = 'resnet'
  c.model.depth = int(match.group(2) or 50)  # 18, 34, 50, 101, 152.
  c.model.residual = match.group(1) != 'plain'
  # Where bottlenecks (50/101/152) downsample: '1x1' the paper (v1), '3x3' torchvision (v1.5).
  c.model.stride_in_bottleneck = '3x3' if match.group(3) else '1x1'
  del c.model['batch_norm']
  c.train.batch_size = 256
  c.train.num_epochs = 90.0
  c.schedule.boundaries = (30 / 90, 60 / 90)
  c.schedule.warmup_steps = 0
  return c


def imagenet_input(c, image_size=224):
  """ImageNet through the streaming pipeline (shared by the ImageNet configs)."""
  c.dataset.name = 'imagenet2012'
  c.input.image_size = image_size
  c.input.normalization = 'imagenet'
  c.input.crop_padding = 0
  c.input.workers = -1  # -1: one per CPU core but one, at most 16 (docs/performance.md: images/s per core).
  c.train.eval_batch_size = 250  # 50,000 validation images in 200 batches.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
