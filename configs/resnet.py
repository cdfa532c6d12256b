"""CIFAR-10 ResNets and plain nets, the recipe of He et al. 2015, section 4.2; the ImageNet
ResNets of section 3.4 (`imagenet_*`, listed in IMAGENET).

  python -m cvjax.main --config=configs/resnet.py:quick --workdir=runs/quick_cifar
  python -m cvjax.main --config=configs/resnet.py --workdir=runs/resnet20 \
      --config.dataset.path=cifar10.tar.gz --config.train.num_epochs=3
  python -m cvjax.main --config=configs/resnet.py:plain56 --workdir=runs/plain56

The arg picks the net: resnetN or plainN for depth N = 6n+2 (default resnet20); `quick`:
ResNet-20 for 5 epochs on the 5,000 CIFAR-10 training images that ship with cvjax (offline; a
look at the code, not a result); `resnetN_modern` (e.g. resnet20_modern): the same net and
schedule length with today's recipe (`modern_cifar`). The ImageNet args add
`imagenet_resnet50_tv2` (torchvision's new recipe) and `imagenet_resnet50_mlperf` (MLPerf's
LARS recipe), neither yet measured; docs/recipes.md lists the fields.
Paper: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
48k iterations, stop at 64k (~164 epochs of 50k images); 4-pixel padding, random 32x32
crops, horizontal flips, per-pixel mean subtraction. Test error: ResNet-20 8.75%,
ResNet-56 6.97%, ResNet-110 6.43%. ResNet-110 warms up at lr 0.01 (here: linear warm-up
over the first 400 steps).

Measured (README, docs/results; 2-core CPUs):
  quick: 5 epochs, 2 min 45 s cold, 60.4% test error (AMD EPYC Zen 5, shared).
  resnet20 for 3 epochs (num_epochs=3, the CIFAR-10 JPEG copy): 31.34% test error, ~13 min;
  plain20 the same: 37.67%, ~7 min (2-core CPU, 2026-11-25). With 3 seeds as populations
  (experiments/depth_ablation.py:quick, 3 epochs, AMD EPYC Zen 5, 2 cores, 2026-12-02):
  resnet20 31.37 ± 0.77%, plain20 38.22 ± 2.71%, resnet56 55.73 ± 7.42%, plain56 78.75 ± 8.51%.
  One CIFAR-10 epoch of resnet20:
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
  if arg == 'imagenet_resnet50_tv2':
    return imagenet_tv2()
  if arg == 'imagenet_resnet50_mlperf':
    return imagenet_mlperf()
  if arg.endswith('_modern'):
    return modern_cifar(get_config(arg[:-len('_modern')]))
  if arg == 'quick':
    c = get_config('resnet20')
    c.dataset.name = 'cifar10_6k'  # 5,000 train / 1,000 test, in cvjax/data/embedded.
    c.train.num_epochs = 5.0  # 195 steps of 128.
    c.train.log_every_steps = 39  # Once per epoch.
    return c
  match = re.fullmatch(r'(resnet|plain)(\d+)', arg)
  if not match:
    raise ValueError(f'configs/resnet.py:{arg}: expected resnetN, plainN (e.g. resnet56), '
                     'resnetN_modern, quick, imagenet_resnet50_tv2, imagenet_resnet50_mlperf, '
                     f'or one of {", ".join(IMAGENET)}.')
  c = common.base_config()  # Its dataset, input, optimizer and schedule are this recipe's.
  c.model.name = 'resnet_cifar'  # The CIFAR builder in cvjax/models (3 stages of 2n blocks).
  c.model.depth = int(match.group(2))  # 6n+2: 20, 32, 44, 56, 110, 1202.
  c.model.residual = match.group(1) == 'resnet'  # False: the plain twin.
  c.model.activation = 'relu'  # relu | tanh | sigmoid.
  c.model.batch_norm = True  # After each conv, as in the paper (False: for the activations sweep).
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
  c.model.name = 'resnet'  # The ImageNet builder in cvjax/models.
  c.model.depth = depth  # 18, 34, 50, 101, 152.
  c.model.residual = kind == 'resnet'  # False: the plain twin.
  c.model.activation = 'relu'  # The paper's ReLU.
  c.model.bn_momentum = 0.9  # Flax convention: PyTorch's 0.1.
  c.model.zero_init_residual = False  # True: each block's last BatchNorm scale starts at 0.
  # Where bottlenecks (50/101/152) downsample: '1x1' the paper (v1), '3x3' torchvision (v1.5).
  c.model.stride_in_bottleneck = stride_in_bottleneck
  c.train.batch_size = 256  # The paper's.
  c.train.num_epochs = 90.0  # The paper's ~60e4 iterations of 256.
  c.schedule.boundaries = (30 / 90, 60 / 90)
  return c


def modern_cifar(c):
  """The paper's net and schedule length with the tricks of the CIFAR-10 speed records: label
  smoothing 0.2 and flip test-time augmentation (David Page, "How to train your ResNet",
  2018, the DAWNBench net; Keller Jordan's airbench94, 2024: smoothing 0.2, mirror TTA, Nesterov
  momentum), a moving average of the weights and BatchNorm statistics (airbench94's Lookahead
  keeps one; decay 0.999 per step here, ~1,000 steps, with the warm-up), and linear warm-up
  (one CIFAR-10 epoch at batch 128: 390 steps) into a cosine decay instead of the /10 steps.
  Batch 128, lr 0.1, weight decay 1e-4 and the crops and flips stay He et al.'s, so the
  comparison with `resnetN` is the recipe alone. Mixup and CutMix stay off: they pay off over
  hundreds of epochs (Zhang et al. 2018 trained 200), not in short CPU runs.

    python -m cvjax.main --config=configs/resnet.py:resnet20_modern --workdir=runs/r20m \
        --config.dataset.path=cifar10.tar.gz

  Measured: 10 epochs on cifar10_6k (schedule.warmup_steps=39), seeds 0 and 1: 40.0% and
  41.6% test error against 54.8% and 46.4% for resnet20, most of it the schedule's (AMD EPYC
  Zen 5 class, 2 shared cores, 2026-12-02; docs/recipes.md). The full 164 epochs: not yet
  measured.
  """
  c.train.label_smoothing = 0.2
  c.train.ema_decay = 0.999
  c.eval.flip = True
  c.optimizer.nesterov = True
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 390
  return c


def imagenet_tv2():
  """NOT YET MEASURED: no cvjax run has trained this recipe, nor Mixup, CutMix, random erasing
  or TrivialAugment, which only it uses (a run says so when it starts).

  ResNet-50 with torchvision's new recipe ("How to Train State-Of-The-Art Models Using
  TorchVision's Latest Primitives", Vasilis Vryniotis, PyTorch blog, 2021; the command of
  ResNet50_Weights.IMAGENET1K_V2, 80.86% top-1 against 76.13% for V1): batch 1024 (8 x 128),
  SGD momentum 0.9, lr 0.5, 5 epochs of linear warm-up, cosine decay over 600 epochs, weight
  decay 2e-5 and none on BatchNorm (--norm-weight-decay 0.0), label smoothing 0.1, Mixup 0.2
  and CutMix 1.0 (one of the two per batch), random erasing 0.1, train crops of 176, EMA of
  the weights (--model-ema-steps 32 --model-ema-decay 0.99998, which their script turns into
  decay 1 - 2e-5 * 1024 * 32 / 600 every 32 steps: 0.999966 per step here), TrivialAugment
  (--auto-augment ta_wide; input.auto_augment, in the host workers).

  Not (yet) in cvjax, so not in this config: repeated augmentation (--ra-sampler --ra-reps 4), evaluation at 224 from a 232 resize (here
  the centre 176 of a 201 resize: input.image_size sets both), the warm-up's start at 1% of
  the lr (here 0), and decay on the classifier's bias (here no bias decays). torchvision
  resets the average during the warm-up epochs; here the average's own warm-up
  (train.ema_warmup) forgets the start instead.

    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet50_tv2 --workdir=runs/tv2 \
        --config.dataset.path=/data/imagenet   # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG

  Measured: not yet measured.
  """
  c = imagenet_config('resnet', 50, '3x3')  # torchvision's ResNet-50 (v1.5).
  c.input.image_size = 176
  c.input.auto_augment = 'trivial_augment_wide'
  c.input.random_erasing = 0.1
  c.input.mixup_alpha = 0.2
  c.input.cutmix_alpha = 1.0
  c.input.mix_prob = 1.0
  c.input.cutmix_prob = 0.5
  c.train.batch_size = 1024  # torchvision's 8 GPUs x 128.
  c.train.num_epochs = 600.0  # torchvision's.
  c.train.label_smoothing = 0.1
  c.train.ema_decay = 0.999966
  c.optimizer.learning_rate = 0.5  # torchvision's.
  c.optimizer.weight_decay = 2e-5  # torchvision's, none on BatchNorm (below).
  c.optimizer.decay_bn_and_bias = False
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 5 * (1281167 // 1024)  # 5 epochs of ImageNet's 1,281,167 images.
  return c


def imagenet_mlperf():
  """NOT YET MEASURED: no cvjax run has trained this recipe, nor LARS or the polynomial
  schedule, which only it uses (a run says so when it starts).

  ResNet-50 with MLPerf Training's LARS recipe (the reference implementation,
  mlcommons/training image_classification/tensorflow2, its README's 8-GPU command; target 75.9%
  top-1): batch 2048 (1024 x 2 accumulated there), LARS with trust coefficient 0.001,
  momentum 0.9 and epsilon 0, base lr 8.5, 5 epochs of linear warm-up then polynomial decay of
  power 2 (lars_util.py) to 1e-4, 41 epochs, weight decay 2e-4 (the README's flag) with
  BatchNorm and biases excluded from decay and trust ratio, label smoothing 0.1. With less
  memory, --config.train.accumulate_steps=2 runs the reference's two micro-batches of 1024
  (each normalised by its own BatchNorm statistics).

    python -m cvjax.main --config=configs/resnet.py:imagenet_resnet50_mlperf --workdir=runs/lars \
        --config.dataset.path=/data/imagenet

  Measured: not yet measured.
  """
  c = imagenet_config('resnet', 50, '3x3')
  c.train.batch_size = 2048  # MLPerf's reference: 1024 x 2 accumulated.
  c.train.num_epochs = 41.0  # MLPerf's reference.
  c.train.label_smoothing = 0.1
  c.optimizer.name = 'lars'
  c.optimizer.learning_rate = 8.5  # MLPerf's base lr for batch 2048.
  c.optimizer.momentum = 0.9
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.weight_decay = 2e-4  # The README's flag; not on BatchNorm or biases.
  c.optimizer.decay_bn_and_bias = False
  c.schedule.name = 'polynomial'
  c.schedule.power = 2.0
  c.schedule.end_value = 1e-4
  c.schedule.warmup_steps = 5 * (1281167 // 2048)
  return c
