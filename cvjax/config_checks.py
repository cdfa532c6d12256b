"""Every check of a config's fields and of their combinations, before a run writes anything:
a negative learning rate or a boundary outside the run would train without a word of warning.

`check_config` needs only the config (and the devices the batch is split over); the checks
that need a fact of the run take it as an argument and are called where it becomes known:
the devices (`check_mesh`, from cvjax.sharding.make_mesh), the pipeline and the processes
(`check_pipeline`, from cvjax.data.make_input), the dataset's size and image shape
(`check_data`, from cvjax.experiment.steps_for and the in-memory loader). Each model family
checks its own `model` fields in its module (cvjax/models). No jax here: the checks run
before anything is built."""

import importlib.util
import math

from absl import logging

from cvjax.errors import UserError


def check_config(config, num_devices):
  """Rejects values the loop would misread, before the run writes anything."""
  t = config.train
  if t.batch_size <= 0 or t.batch_size % num_devices:
    raise UserError(f'train.batch_size={t.batch_size} must be a positive multiple of the '
                    f'{num_devices} devices the batch is split over.')
  if t.eval_batch_size <= 0:  # Rounded up to a multiple of the devices (experiment.py).
    raise UserError(f'train.eval_batch_size={t.eval_batch_size}; expected a positive number.')
  k = t.accumulate_steps
  if isinstance(k, int) and k > 1 and t.batch_size % (k * num_devices):
    raise UserError(f'train.batch_size={t.batch_size} does not split into '
                    f'train.accumulate_steps={k} micro-batches over {num_devices} device(s): '
                    f'use a multiple of {k * num_devices}.')
  if t.compute_dtype not in ('float32', 'bfloat16', 'auto'):
    raise UserError(f'train.compute_dtype={t.compute_dtype!r}; expected float32, bfloat16 or '
                    'auto (bfloat16 on GPUs and TPUs, float32 on CPUs).')
  at_least = {
      'log_every_steps': (1, 'log every N steps'),
      'keep_checkpoints': (1, 'how many of the latest checkpoints to keep'),
      'checkpoint_every_steps': (0, 'save every N steps; 0: only at the end and on preemption'),
      'eval_every_steps': (0, 'evaluate every N steps; 0: once per epoch'),
      'grad_norm_every_steps': (0, 'log gradient norms every N steps; 0: off'),
      'steps_per_call': (1, 'train steps per dispatch of the jitted loop'),
  }
  for key, (low, meaning) in at_least.items():
    value = t[key]
    if not isinstance(value, int) or value < low:
      raise UserError(f'train.{key}={value!r}; expected an integer >= {low} ({meaning}).')
  check_run_length(config)
  check_eval(config)
  check_values(config)
  if is_population(config) and (config.mesh.model != 1 or config.mesh.fsdp):
    raise UserError('mesh.model and mesh.fsdp split one run\'s parameters; a population '
                    '(population.seeds > 1 or population.vary) splits its members or their '
                    'batches over the devices: leave mesh.model=1 and mesh.fsdp=False.')


def check_run_length(config):
  """train.num_steps, or train.num_epochs where it is unset."""
  t = config.train
  if t.num_steps is not None and t.num_steps <= 0:
    raise UserError(f'train.num_steps={t.num_steps}; expected a positive number of steps (or '
                    'leave it unset and set train.num_epochs).')
  if t.num_steps is None and not (_is_number(t.num_epochs) and t.num_epochs > 0):
    raise UserError(f'train.num_epochs={t.num_epochs!r}; expected a positive number (or set '
                    'train.num_steps).')


def is_population(config):
  """Whether `config` trains several members (cvjax/population.py)."""
  pop = config.population
  return pop.seeds != 1 or bool(pop.vary.strip())


def check_eval(config):
  """eval.crops, eval.flip and eval.translate, and how they combine."""
  e = config.eval
  if not isinstance(e.flip, bool):
    raise UserError(f'eval.flip={e.flip!r}; expected True or False.')
  if e.crops not in (1, 10):
    raise UserError(f'eval.crops={e.crops}; expected 1 (centre) or 10 (corners, centre and '
                    'their flips, logits averaged).')
  if e.flip and e.crops == 10:
    raise UserError('eval.flip=True with eval.crops=10: the ten crops already hold the mirror '
                    'images of the other five; set one of them.')
  pixels = e.translate
  if not isinstance(pixels, int) or isinstance(pixels, bool) or not 0 <= pixels <= 8:
    raise UserError(f'eval.translate={pixels!r}; expected an integer in [0, 8] (pixels of the '
                    'shifted test views; 0: none; airbench94: 1).')
  if pixels and not e.flip:
    raise UserError(f'eval.translate={pixels} averages shifted views of the image and of its '
                    'mirror image: set eval.flip=True too (airbench94\'s test-time '
                    'augmentation), or eval.translate=0.')


def check_mesh(config, num_devices, local_devices=None, process_count=1):
  """`mesh.model` (returned) and `mesh.fsdp`, against the `num_devices` of this run
  (`local_devices` of them in each of `process_count` processes)."""
  model, fsdp = config.mesh.model, config.mesh.fsdp
  if not isinstance(model, int) or isinstance(model, bool) or model < 1 or num_devices % model:
    raise UserError(f'mesh.model={model!r}; expected a positive integer that divides the '
                    f'{num_devices} devices of this run (the rest of them split the batch '
                    'along mesh axis data).')
  if not isinstance(fsdp, bool):
    raise UserError(f'mesh.fsdp={fsdp!r}; expected True (parameters and optimizer state split '
                    'over the data axis) or False (replicated over it).')
  if process_count > 1 and local_devices % model:
    raise UserError(f'mesh.model={model} does not divide the {local_devices} devices of each '
                    'process: a model replica must not span processes, which read their own '
                    'share of the batch.')
  return model


def check_pipeline(config, pipeline, process_count=1):
  """What the data's pipeline ('memory' or 'streaming', data.pipeline_for) cannot do: the
  in-memory augmentations and loops on streamed data, the host workers' on data in memory."""
  inp, t = config.input, config.train
  if pipeline == 'memory':
    if inp.auto_augment:
      raise UserError(f'input.auto_augment={inp.auto_augment!r} runs in the streaming '
                      'pipeline\'s host workers, and this data is held in memory (augmented on '
                      'the device). Set dataset.pipeline=streaming to stream it (an image folder '
                      'or ImageNet), or leave input.auto_augment empty; input.random_erasing, '
                      'mixup_alpha and cutmix_alpha work with either pipeline.')
    if config.eval.crops == 10 and not inp.crop_padding:
      raise UserError('eval.crops=10 on in-memory data crops from test images padded by '
                      'input.crop_padding, as in training; set input.crop_padding > 0.')
    return
  if inp.alternate_flip or inp.crop_pad_mode != 'constant':
    raise UserError('input.alternate_flip and input.crop_pad_mode=reflect are augmentations of '
                    'data held on the device (airbench94\'s, configs/speedrun.py); this dataset '
                    'streams from disk (dataset.pipeline), where the host workers crop and flip: '
                    'leave them off, or hold the data in memory (dataset.pipeline=memory).')
  if t.steps_per_call > 1:
    raise UserError(f'train.steps_per_call={t.steps_per_call} loops over batches '
                    'held on the device; this dataset streams from disk (dataset.pipeline), one '
                    'batch per call: leave train.steps_per_call=1.')
  if is_population(config):
    raise UserError('a population (population.seeds > 1 or population.vary) trains on data '
                    'held on the device; this dataset streams from disk (dataset.pipeline). '
                    'Train its members as separate runs instead, e.g. a sweep over seed.')
  if not inp.image_size:
    raise UserError('streaming input needs input.image_size, the side of the square crops '
                    '(224 for the ImageNet nets).')
  if inp.normalization not in ('imagenet', 'none'):
    raise UserError(f'input.normalization={inp.normalization!r} needs statistics of the whole '
                    'training set, which streaming input does not hold; use imagenet '
                    '(ImageNet\'s per-channel mean and std) or none.')
  for key in ('batch_size', 'eval_batch_size'):
    if t[key] % process_count:
      raise UserError(f'train.{key}={t[key]} must be a multiple of the '
                      f'{process_count} processes that each read their share.')


def check_data(config, num_train=None, image_shape=None):
  """The config against its dataset: `num_train` examples (and the run's length, for a plan
  made without check_config), images of `image_shape` (HWC)."""
  batch = config.train.batch_size
  if num_train is not None:
    check_run_length(config)
    if batch > num_train:
      raise UserError(f'train.batch_size={batch} exceeds the {num_train} training examples.')
  size = config.input.image_size
  if image_shape is not None and size and (image_shape[0] > size or image_shape[1] > size):
    raise UserError(f'input.image_size={size} is smaller than the {image_shape[0]}x'
                    f'{image_shape[1]} images.')


def warn_slow_dtype(config, platform, native_conv):
  """bfloat16 where it is slower than float32: on a CPU (`platform`) with XLA's convolutions
  (`native_conv`: whether oneDNN's run them, cvjax.ops.convolution.native_for)."""
  if config.train.compute_dtype == 'bfloat16' and platform == 'cpu' and not native_conv:
    logging.warning('train.compute_dtype=bfloat16 on a CPU with XLA\'s convolutions is slower '
                    'than float32: XLA:CPU has no fast bfloat16 convolutions (ResNet-20: 246 '
                    'img/s against 369 in float32, docs/performance.md). oneDNN\'s bfloat16 '
                    'convolutions (train.native_conv=True, a CPU with avx512_bf16 or AMX) are '
                    'the fast ones; elsewhere keep float32.')


def _is_number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_values(config):
  """Signs, ranges and types of the optimizer, schedule, input and seed fields: a negative
  learning rate or a boundary outside the run trains without a word of warning."""
  o, sch, inp, t = config.optimizer, config.schedule, config.input, config.train
  numbers = [  # (field, value, test, what is expected)
      ('optimizer.learning_rate', o.learning_rate, lambda v: v > 0, 'a positive number'),
      ('optimizer.weight_decay', o.weight_decay, lambda v: v >= 0,
       'a number >= 0 (0: off)'),
      ('optimizer.momentum', o.momentum, lambda v: 0 <= v < 1,
       'a number in [0, 1) (0: plain SGD)'),
      ('schedule.decay_factor', sch.decay_factor, lambda v: v > 0,
       'a positive factor (0.1: /10 at each boundary)'),
      ('schedule.power', sch.power, lambda v: v > 0,
       'a positive exponent of the polynomial schedule'),
      ('schedule.end_value', sch.end_value, lambda v: 0 <= v <= o.learning_rate,
       f'a learning rate in [0, optimizer.learning_rate={o.learning_rate}]'),
      ('optimizer.b1', o.b1, lambda v: 0 <= v < 1, 'a number in [0, 1)'),
      ('optimizer.b2', o.b2, lambda v: 0 <= v < 1, 'a number in [0, 1)'),
      ('optimizer.eps', o.eps, lambda v: v >= 0, 'a number >= 0'),
      ('optimizer.trust_coefficient', o.trust_coefficient, lambda v: v > 0,
       "a positive number (LARS's eta, 0.001)"),
      ('train.label_smoothing', t.label_smoothing, lambda v: 0 <= v < 1,
       'a number in [0, 1) (0: off; 0.1 in torchvision\'s recipe)'),
      ('train.ema_decay', t.ema_decay, lambda v: 0 <= v < 1,
       'a per-step decay in [0, 1) (0: no moving average; e.g. 0.999)'),
      ('input.random_erasing', inp.random_erasing, lambda v: 0 <= v <= 1,
       'a probability in [0, 1] (0: off)'),
      ('input.mixup_alpha', inp.mixup_alpha, lambda v: v >= 0,
       'a number >= 0 (0: off; 0.2 in torchvision\'s recipe)'),
      ('input.cutmix_alpha', inp.cutmix_alpha, lambda v: v >= 0,
       'a number >= 0 (0: off; 1.0 in torchvision\'s recipe)'),
      ('input.mix_prob', inp.mix_prob, lambda v: 0 <= v <= 1,
       'a probability in [0, 1]'),
      ('input.cutmix_prob', inp.cutmix_prob, lambda v: 0 <= v <= 1,
       'a probability in [0, 1]'),
      ('optimizer.bn_bias_lr_scale', o.bn_bias_lr_scale, lambda v: v > 0,
       'a positive factor (1: off; airbench94: 64)'),
      ('optimizer.whiten_bias_frozen_at', o.whiten_bias_frozen_at,
       lambda v: 0 <= v <= 1, 'a fraction of the run in [0, 1] (1: never frozen)'),
      ('optimizer.lookahead_decay', o.lookahead_decay, lambda v: 0 <= v <= 1,
       'a decay in [0, 1] (airbench94: 0.95 ** 5)'),
  ]
  for field, value, test, expected in numbers:
    if not _is_number(value) or not test(value):
      raise UserError(f'{field}={value!r}; expected {expected}.')
  integers = [  # (field, value, low, high, meaning)
      ('schedule.warmup_steps', sch.warmup_steps, 0, None, 'steps of linear warm-up'),
      ('input.crop_padding', inp.crop_padding, 0, 256,
       'pixels of zero padding for random crops; 0: off'),
      ('input.image_size', inp.image_size, 0, 4096,
       'the side of the input images; 0: as stored'),
      ('seed', config.seed, 0, 2 ** 31 - 1, 'JAX and grain take 32-bit seeds'),
      ('train.accumulate_steps', t.accumulate_steps, 1, None,
       'micro-batches per update; 1: off'),
      ('optimizer.lookahead_every', o.lookahead_every, 0, None,
       'steps between Lookahead updates; 0: off'),
  ]
  for field, value, low, high, meaning in integers:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
        or (high is not None and value > high)):
      limit = f'>= {low}' if high is None else f'in [{low}, {high}]'
      raise UserError(f'{field}={value!r}; expected an integer {limit} ({meaning}).')
  auto = inp.auto_augment
  if auto not in ('', 'trivial_augment_wide'):
    raise UserError(f'input.auto_augment={auto!r}; expected \'\' (off) or trivial_augment_wide '
                    '(TrivialAugment, torchvision\'s TrivialAugmentWide; streamed input).')
  if inp.train_resize not in ('pil', 'opencv'):
    raise UserError(f'input.train_resize={inp.train_resize!r}; expected pil (Pillow) or opencv '
                    '(OpenCV, faster; streamed input).')
  if inp.train_resize == 'opencv' and importlib.util.find_spec('cv2') is None:
    raise UserError('input.train_resize=opencv needs OpenCV, which is not installed: '
                    '`pip install opencv-python-headless` (requirements.txt pins it), or '
                    'set input.train_resize=pil.')
  if inp.crop_pad_mode not in ('constant', 'reflect'):
    raise UserError(f'input.crop_pad_mode={inp.crop_pad_mode!r}; expected constant (zeros) or '
                    'reflect (airbench94\'s translate).')
  airbench = (o.bn_bias_lr_scale != 1 or o.whiten_bias_frozen_at < 1
              or o.lookahead_every)
  if airbench and o.name != 'sgd':
    raise UserError(f'optimizer.bn_bias_lr_scale, whiten_bias_frozen_at and lookahead_every are '
                    f'parts of airbench94\'s SGD; optimizer.name={o.name!r} ignores them: set '
                    'optimizer.name=sgd or leave them off.')
  boundaries = sch.boundaries
  if sch.name == 'piecewise' and (not isinstance(boundaries, (tuple, list)) or not all(
      _is_number(b) and 0 <= b <= 1 for b in boundaries)):
    raise UserError(f'schedule.boundaries={boundaries!r}; expected fractions of the run in '
                    '[0, 1], e.g. (0.5, 0.75): /10 at half and three quarters of the steps.')


# What only recipes that no run has measured use (configs/resnet.py: imagenet_resnet50_tv2,
# imagenet_resnet50_mlperf; docs/recipes.md): (field, is it on?). Move a line out once a run
# in docs/results has measured it.
UNMEASURED = (
    ('optimizer.name=lars', lambda c: c.optimizer.name == 'lars'),
    ('schedule.name=polynomial', lambda c: c.schedule.name == 'polynomial'),
    ('input.mixup_alpha', lambda c: c.input.mixup_alpha > 0),
    ('input.cutmix_alpha', lambda c: c.input.cutmix_alpha > 0),
    ('input.random_erasing', lambda c: c.input.random_erasing > 0),
    ('input.auto_augment', lambda c: bool(c.input.auto_augment)),
)


def unmeasured(config):
  """The fields of `config` (see UNMEASURED) that no run has measured yet."""
  return [field for field, on in UNMEASURED if on(config)]


def warn_unmeasured(config):
  """One line at the start of a run whose recipe no run has measured: it may not reach its
  source's number here."""
  fields = unmeasured(config)
  if fields:
    logging.warning('Not yet measured: no cvjax run has trained with %s (the ImageNet recipes '
                    'imagenet_resnet50_tv2 and imagenet_resnet50_mlperf use them); treat this '
                    'run\'s numbers as the first, not a reproduction (docs/recipes.md).',
                    ', '.join(fields))


# The fields of `optimizer` and `schedule` each name reads (cvjax/optim.py): a population that
# varies a field its members' runs never read would train identical members without a word.
OPTIMIZER_READS = {
    'sgd': {'learning_rate', 'momentum', 'nesterov', 'weight_decay', 'decay_bn_and_bias'},
    'adamw': {'learning_rate', 'b1', 'b2', 'eps', 'weight_decay', 'decay_bn_and_bias'},
    'lamb': {'learning_rate', 'b1', 'b2', 'eps', 'weight_decay', 'decay_bn_and_bias'},
    'lars': {'learning_rate', 'momentum', 'nesterov', 'weight_decay', 'decay_bn_and_bias',
             'trust_coefficient'},
}
SCHEDULE_READS = {
    'piecewise': {'warmup_steps', 'boundaries', 'decay_factor'},
    'cosine': {'warmup_steps'},
    'polynomial': {'warmup_steps', 'power', 'end_value'},
    'constant': {'warmup_steps'},
}


def reads(config, field):
  """Whether a run of `config` reads `field` ('section.key'). Every `name` is read; a model's
  fields are those its family's config fills for its builder, so all count as read."""
  section, _, key = field.partition('.')
  table = {'optimizer': OPTIMIZER_READS, 'schedule': SCHEDULE_READS}.get(section)
  if table is None or key == 'name':
    return True
  o = config.optimizer
  if field == 'optimizer.nesterov' and not o.momentum:
    return False  # Nesterov of no momentum: plain SGD either way.
  if field == 'optimizer.decay_bn_and_bias' and o.name != 'lars' and not o.weight_decay:
    return False  # Only the decay's mask (and LARS's trust ratio's) reads it.
  return key in table.get(config[section].name, {key})  # An unknown name fails elsewhere.


def check_read(config, fields):
  """Refuses a field in `fields` that a run of `config` never reads."""
  for field in fields:
    if not reads(config, field):
      section = field.split('.')[0]
      name = config[section].name
      table = OPTIMIZER_READS if section == 'optimizer' else SCHEDULE_READS
      if field.split('.')[1] in table.get(name, ()):
        off = 'optimizer.momentum=0' if 'nesterov' in field else 'optimizer.weight_decay=0'
        raise UserError(f'{field} is not read with {off}: varying it would train identical '
                        'runs.')
      raise UserError(f'{field} is not read by {section}.name={name!r}, which reads '
                      f'{", ".join(sorted(table[name]))}: varying it would train identical '
                      'runs.')
