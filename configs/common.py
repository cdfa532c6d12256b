"""What every run's config holds, whatever its model: the base each family's config builds on.

A family's file (lenet, alexnet, vgg, resnet) starts from `base_config()`, fills `model` with
the fields its builder in cvjax/models reads, and changes the recipe's numbers; the ImageNet
recipes add `imagenet_input`. The values here are those of He et al.'s CIFAR recipe, which the
families changed in turn before this file existed.
"""

import ml_collections
from ml_collections import config_dict


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, data order, augmentation and dropout draws.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'cifar10'  # A tfds name, or one shipped with cvjax (mnist10k, cifar10_6k).
  c.dataset.data_dir = ''  # tfds data_dir ('' = tfds default).
  c.dataset.path = ''  # Local raw files instead of tfds: IDX folder or image folder/.tar.gz.
  c.dataset.download = True  # Let tfds download when the data is not in data_dir.
  # memory: the whole dataset on the device; streaming: decoded and augmented by host
  # workers from disk (ImageNet); auto: streaming for imagenet* and large image folders.
  c.dataset.pipeline = 'auto'

  c.input = ml_collections.ConfigDict()
  c.input.image_size = 0  # Zero-pad images to this size (0: keep as is); streaming: the crop.
  c.input.normalization = 'per_pixel_mean'  # per_pixel_mean | per_channel | imagenet | none.
  # In memory: random crops from images zero-padded by this (0: off); eval.crops=10 cuts its
  # crops from test images padded by it.
  c.input.crop_padding = 4
  c.input.flip = True  # Random horizontal flips.
  # With flip: each image is flipped in every other epoch, starting from a random half in
  # epoch 0, instead of at random each time (airbench94's derandomised flips).
  c.input.alternate_flip = False
  c.input.crop_pad_mode = 'constant'  # The crops' padding: constant (zeros) | reflect.
  # When the data stream (dataset.pipeline; `auto` streams large image folders of any
  # config): Inception-style random-resized crops to image_size, decoded by this many grain
  # worker processes (0: threads of the training process; -1: one per CPU core but one, at
  # most 16; docs/performance.md: images/s per core).
  c.input.random_crop_area = (0.08, 1.0)  # Fraction of the image's area.
  c.input.random_crop_aspect = (3 / 4, 4 / 3)  # Width / height, sampled log-uniformly.
  c.input.workers = 0  # Streaming decoder processes (0: threads of the training process).
  c.input.threads = 2  # Reading threads per process.
  # On the device, after the crops and flips, for either pipeline (docs/recipes.md; all off):
  c.input.random_erasing = 0.0  # Probability of erasing a random box of each image.
  c.input.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) (0: off).
  c.input.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) (0: off).
  c.input.mix_prob = 1.0  # Probability that a batch is mixed (when an alpha is set).
  c.input.cutmix_prob = 0.5  # With both alphas: probability of CutMix rather than Mixup.
  # Streamed input only, in the host workers: '' (off) | trivial_augment_wide.
  c.input.auto_augment = ''
  # Streamed input only: the train crop's resize to image_size, pil (Pillow's antialiased
  # bilinear) | opencv (OpenCV's SIMD area/bilinear resize: ~5x faster, a different filter;
  # docs/performance.md). Evaluation always resizes with Pillow.
  c.input.train_resize = 'pil'

  c.eval = ml_collections.ConfigDict()
  c.eval.crops = 1  # 1: the centre crop; 10: corners, centre and their flips, logits averaged.
  c.eval.flip = False  # With crops=1: logits averaged over the image and its mirror image.
  # With flip: also the views shifted by this many pixels up-left and down-right (reflect
  # padding), weighted 1/4 each against 1/2 for the unshifted (airbench94's tta_level=2: 1).
  c.eval.translate = 0

  c.model = ml_collections.ConfigDict()  # The family's config fills it.

  # Several members trained together in one program (cvjax/population.py): `seeds` members
  # (seeds seed, seed+1, ...) for each combination of the `vary` values, e.g.
  # vary='model.residual=False,True' (space-separated FIELD=V1,V2 items, FIELD in model.*,
  # optimizer.* or schedule.*). Each member is the run its own config would train alone.
  c.population = ml_collections.ConfigDict()
  c.population.seeds = 1  # Members per set of vary values, seeds seed, seed+1, ... (1: one run).
  c.population.vary = ''  # Space-separated FIELD=V1,V2 items, e.g. 'model.residual=False,True'.

  # The devices form a (data, model) mesh (cvjax/sharding.py, docs/parallelism.md): the batch
  # is split over data; `model` devices split one copy of the parameters by the model's rules
  # (AlexNet's towers, the dense classifier of AlexNet and VGG).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.model = 1  # Devices per model replica; must divide the device count.
  c.mesh.fsdp = False  # Also split parameters and optimizer state over data (FSDP).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # sgd | adamw | lars | lamb (cvjax/optim.py).
  c.optimizer.learning_rate = 0.1  # The peak step size (after any warm-up) the schedule decays.
  c.optimizer.momentum = 0.9  # sgd, lars.
  c.optimizer.nesterov = False  # sgd, lars.
  c.optimizer.weight_decay = 1e-4  # L2 penalty on the weights (adamw: decoupled).
  # False: no weight decay on BatchNorm scales and biases nor any bias (nor LARS's trust ratio).
  c.optimizer.decay_bn_and_bias = True
  c.optimizer.b1 = 0.9  # adamw, lamb.
  c.optimizer.b2 = 0.999  # adamw, lamb.
  c.optimizer.eps = 1e-8  # adamw, lamb.
  c.optimizer.trust_coefficient = 0.001  # lars.
  # airbench94's pieces, sgd only (cvjax/optim.py; configs/speedrun.py):
  c.optimizer.bn_bias_lr_scale = 1.0  # BatchNorm biases: lr times this, weight decay over it.
  c.optimizer.whiten_bias_frozen_at = 1.0  # Whitening bias frozen from this fraction (1: never).
  c.optimizer.lookahead_every = 0  # Lookahead every this many steps (0: off).
  # Lookahead's decay: this * (step / total) ** 3; the weights set to the average at the end.
  c.optimizer.lookahead_decay = 0.95 ** 5

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'piecewise'  # piecewise | cosine | polynomial | constant | triangular.
  # He et al.'s CIFAR recipe: 32k and 48k of 64k steps.
  c.schedule.boundaries = (0.5, 0.75)  # piecewise: lr x decay_factor at these fractions of the run.
  c.schedule.decay_factor = 0.1  # piecewise: the lr's factor at each boundary.
  c.schedule.warmup_steps = 0  # Linear warm-up from 0 over this many steps.
  c.schedule.power = 2.0  # polynomial: (lr - end_value) * (1 - t/T) ** power + end_value.
  c.schedule.end_value = 0.0  # polynomial: the learning rate at the end.
  # triangular (airbench94's): from triangle_start x lr up to lr at triangle_peak of the run,
  # down to triangle_end x lr at its end.
  c.schedule.triangle_start = 0.2  # triangular: the lr's factor at the start.
  c.schedule.triangle_peak = 0.23  # triangular: the fraction of the run where the lr peaks.
  c.schedule.triangle_end = 0.07  # triangular: the lr's factor at the end.

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # Images per step (a population's: per member).
  c.train.num_epochs = 164.0  # Passes over the training images (He et al.: 64k steps of 128).
  c.train.num_steps = config_dict.placeholder(int)  # Wins over num_epochs when set.
  # Test images per evaluation batch (memory, not results): rounded up to a multiple of the
  # devices, the padding masked.
  c.train.eval_batch_size = 1000
  c.train.eval_every_steps = 0  # 0: once per epoch.
  c.train.log_every_steps = 100  # A progress line and train metrics every this many steps.
  c.train.checkpoint_every_steps = 2000  # A checkpoint every this many steps (0: at the end only).
  c.train.keep_checkpoints = 3  # The newest this many checkpoints are kept.
  # float32 | bfloat16 | auto: bfloat16 on GPUs and TPUs, float32 on CPUs. Parameters,
  # optimizer state, BatchNorm statistics, logits and loss stay float32 (bfloat16 on CPU:
  # docs/performance.md).
  c.train.compute_dtype = 'float32'
  # Forward and backward as two XLA programs (True) or the plain jax.grad step (False).
  # Unset: two where the backend is CPU, where it was measured faster (docs/performance.md),
  # one elsewhere; decided when the step is built (cvjax.steps.split_backward).
  c.train.split_backward = config_dict.placeholder(bool)
  # Train steps per dispatch from the host (in-memory data): a lax.scan of this many steps in
  # one program, which removes the per-step host overhead that bounds small nets on GPUs and
  # TPUs. Logs, evaluations and checkpoints keep their steps (a call stops at them).
  c.train.steps_per_call = 1
  c.train.grad_norm_every_steps = 0  # Log per-layer gradient norms every N steps (0: off).
  # Skip updates whose loss or gradients are not finite (counted as train/skipped_nonfinite)
  # instead of stopping the run at the first one.
  c.train.skip_nonfinite = False
  # Recipes beyond the papers (docs/recipes.md; all off):
  c.train.label_smoothing = 0.0  # Weight of the uniform distribution in the targets.
  # Moving average of the weights and BatchNorm statistics, evaluated beside them (test/ema_*).
  c.train.ema_decay = 0.0  # Per step; 0: off.
  c.train.ema_warmup = True  # Decay min(ema_decay, (1 + step) / (10 + step)).
  # One update from this many micro-batches of batch_size / accumulate_steps each.
  c.train.accumulate_steps = 1
  # float32 convolutions on oneDNN where the backend is CPU (cvjax.ops.convolution; other
  # backends always keep XLA's). False, or CVJAX_NATIVE=0, keeps XLA's own on CPU too.
  c.train.native_conv = True
  return c


def complete(saved):
  """`saved` (a config.json's dict) on top of `base_config()`: a run written by an older cvjax
  lacks the fields added since, and gets their defaults here, once, so that code reads every
  field this file sets as an attribute. `model` stays as saved: its fields are the family's.
  Fields this file does not know are kept; the values stay as the file has them."""
  def merge(base, over):
    out = dict(base)
    for key, value in over.items():
      out[key] = (merge(base[key], value) if isinstance(value, dict)
                  and isinstance(base.get(key), dict) and key != 'model' else value)
    return out
  return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def imagenet_input(c, image_size=224):
  """ImageNet through the streaming pipeline (cvjax/data/streaming.py), for the ImageNet
  recipes of every family."""
  c.dataset.name = 'imagenet2012'
  c.input.image_size = image_size
  c.input.normalization = 'imagenet'
  c.input.crop_padding = 0
  c.input.workers = -1  # One grain worker per CPU core of the host but one.
  c.input.train_resize = 'opencv'  # The host's decoding keeps an accelerator fed.
  c.train.eval_batch_size = 250  # 50,000 validation images in 200 batches.
  c.train.compute_dtype = 'auto'  # bfloat16 on accelerators, as published ResNet-50 numbers.
  c.train.log_every_steps = 50  # ImageNet's steps are long: a line every 50.
  c.train.checkpoint_every_steps = 1000  # ImageNet: a checkpoint every 1,000 steps.
