"""Imports torchvision's ImageNet weights into a cvjax checkpoint:

  python -m cvjax.import_weights --model=resnet50 --weights=resnet50-11ad3fa6.pth --workdir=DIR
  python -m cvjax.evaluate --config=configs/resnet.py:imagenet_resnet50_v1.5 --workdir=DIR \
      --config.dataset.path=...

Models: resnet18/34/50/101/152 (ResNet-50 and deeper are torchvision's "v1.5" bottleneck:
`model.stride_in_bottleneck='3x3'`), vgg11/13/16/19 and their `_bn` variants, and alexnet
(torchvision's one-tower net: `model.variant='torchvision'`). The file is a state dict as
torchvision publishes it, read with `torch.load(..., weights_only=True)`, so no pickled code
runs; torch is needed only here.

The checkpoint is the training loop's (step 0, a fresh optimizer state, the run fingerprint of
`--config`), so `cvjax.main` with the same config fine-tunes it and `cvjax.evaluate`
evaluates it. Every source tensor is used exactly once and every cvjax parameter and
BatchNorm statistic is filled exactly once, or nothing is written and the error names what
did not match. `--num_classes=N` (different from the file's) keeps everything but the last
layer, which starts at zero (as big_vision fine-tunes): the way to fine-tune on other classes.
"""

import json
import os
import re
import sys

import numpy as np

from cvjax import runtime
from cvjax.errors import UserError

# --model: (its config, the model fields torchvision's architecture needs).
SOURCES = {
    **{f'resnet{d}': (f'configs/resnet.py:imagenet_resnet{d}{"_v1.5" if d >= 50 else ""}',
                      {'name': 'resnet', 'depth': d, 'residual': True, 'activation': 'relu',
                       **({'stride_in_bottleneck': '3x3'} if d >= 50 else {})})
       for d in (18, 34, 50, 101, 152)},
    **{f'vgg{d}{bn}': (f'configs/vgg.py:imagenet_vgg{d}{bn}',
                       {'name': 'vgg', 'depth': d, 'batch_norm': bn == '_bn',
                        'activation': 'relu'})
       for d in (11, 13, 16, 19) for bn in ('', '_bn')},
    'alexnet': ('configs/alexnet.py:imagenet_torchvision',
                {'name': 'alexnet', 'variant': 'torchvision', 'groups': 1, 'activation': 'relu'}),
}

# torchvision's state dicts count BatchNorm updates (used only with momentum=None); cvjax's
# BatchNorm keeps no counter. These are the only source tensors left unused, by design.
UNUSED_BY_DESIGN = re.compile(r'.*num_batches_tracked$')


def default_config(model):
  """The config of torchvision's `model`: its family's ImageNet recipe."""
  import importlib  # pylint: disable=g-import-not-at-top
  path, arg = SOURCES[model][0].split(':')
  return importlib.import_module(path[:-3].replace('/', '.')).get_config(arg)


def check_model_config(model, config):
  """Refuses a config whose model is not torchvision's `model`, naming the fields."""
  wrong = {k: (config.model.get(k), v) for k, v in SOURCES[model][1].items()
           if config.model.get(k) != v}
  if wrong:
    raise UserError(
        f'--model={model} is torchvision\'s architecture, but the config has '
        + ', '.join(f'model.{k}={a!r} (needs {b!r})' for k, (a, b) in sorted(wrong.items()))
        + f'. Use --config={SOURCES[model][0]} (the default when --config is left out).')


def load_state_dict(path):
  """A torchvision state dict as {name: float32 numpy array}."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError('reading .pth weights needs PyTorch: pip install -r requirements-torch.txt '
                    '(or pip install -e .[torch]).') from e
  if not os.path.isfile(path):
    raise UserError(f'--weights={path} is not a file.')
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'--weights={path} could not be read as a PyTorch state dict with '
                    f'weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]}).') from e
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise UserError(f'--weights={path} holds a {type(state).__name__}, not a state dict of '
                    'tensors (name -> tensor), as torchvision publishes its weights.')
  arrays = {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
  bad = [f'{k} ({np.count_nonzero(~np.isfinite(v))} of {v.size} values)'
         for k, v in arrays.items() if not np.all(np.isfinite(v))]
  if bad:  # A fine-tune would set the checkpoint aside and silently start from random weights.
    raise UserError(f'--weights={path} holds nan or inf values in {len(bad)} tensor(s): '
                    + ', '.join(bad[:8]) + (', ...' if len(bad) > 8 else '')
                    + '. The file is damaged or came from a run that diverged; nothing was '
                    'written.')
  return arrays


# --- cvjax variable path -> (torchvision name, layout). ---

def _leaf(name):
  return {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
          'var': 'running_var'}[name]


def _resnet_name(path):
  """('conv3_1', 'projection_bn', 'scale') -> 'layer2.0.downsample.1.weight'."""
  out = []
  for key in path[:-1]:
    m = re.fullmatch(r'conv(\d)_(\d+)', key)
    if m:
      out.append(f'layer{int(m.group(1)) - 1}.{int(m.group(2)) - 1}')
    else:
      out.append({'projection_conv': 'downsample.0', 'projection_bn': 'downsample.1'}.get(key, key))
  return '.'.join(out + [_leaf(path[-1])])


def _vgg_name(depth, batch_norm):
  """VGG's `features` Sequential numbers conv, (BatchNorm,) ReLU and pool modules in order."""
  from cvjax.models.vgg import CONFIGS  # pylint: disable=g-import-not-at-top
  names, index, convs = {}, 0, 0
  for stage, filters in enumerate(CONFIGS[depth]):
    for i in range(len(filters)):
      names[f'conv{stage + 1}_{i + 1}'] = f'features.{index}'
      if batch_norm:
        names[f'BatchNorm_{convs}'] = f'features.{index + 1}'
      index += 3 if batch_norm else 2
      convs += 1
    index += 1  # The max pool.
  names.update({'fc6': 'classifier.0', 'fc7': 'classifier.3', 'fc8': 'classifier.6'})
  return names


ALEXNET = {'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6',
           'conv4': 'features.8', 'conv5': 'features.10', 'fc6': 'classifier.1',
           'fc7': 'classifier.4', 'fc8': 'classifier.6'}
CLASSIFIER = {'resnet': 'fc', 'vgg': 'fc8', 'alexnet': 'fc8'}


def torch_name(cfg, path):
  """The torchvision name of the cvjax variable at `path` (collection keys stripped)."""
  if cfg.name == 'resnet':
    return _resnet_name(path)
  table = ALEXNET if cfg.name == 'alexnet' else _vgg_name(cfg.depth, cfg.batch_norm)
  if len(path) != 2 or path[0] not in table:
    raise UserError(f'cvjax variable {"/".join(path)} has no torchvision counterpart.')
  return f'{table[path[0]]}.{_leaf(path[1])}'


def to_cvjax_layout(value, path, cfg):
  """torch OIHW conv -> HWIO; Linear (out, in) -> (in, out). The first Linear after the
  flatten (VGG's and AlexNet's fc6) also reorders its inputs: torch flattens the last map as
  (C, H, W), Flax as (H, W, C)."""
  if path[-1] != 'kernel':
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if path[0] == 'fc6':
    out, inputs = value.shape
    channels = 256 if cfg.name == 'alexnet' else 512
    side = int(round((inputs // channels) ** 0.5))
    if channels * side * side != inputs:
      raise UserError(f'fc6 of the file takes {inputs} inputs: not {channels} x H x H.')
    return value.reshape(out, channels, side, side).transpose(2, 3, 1, 0).reshape(inputs, out)
  return value.T


def convert(state_dict, cfg, abstract_variables, keep_classifier=True):
  """{collection: tree} of numpy arrays shaped as `abstract_variables`, each filled from one
  source tensor; raises UserError listing every mismatch. Without `keep_classifier` the last
  layer is left out (it stays at its initialisation) and so are its source tensors."""
  import jax  # pylint: disable=g-import-not-at-top
  classifier = CLASSIFIER[cfg.name]
  torch_classifier = torch_name(cfg, (classifier, 'bias'))[:-len('bias')]
  problems, used, filled = [], {}, {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_variables.get(collection, {})):
      keys = tuple(str(getattr(k, 'key', k)) for k in path)
      if not keep_classifier and keys[0] == classifier:
        continue
      name = torch_name(cfg, keys)
      where = f'{collection}/{"/".join(keys)}'
      if name in used:
        problems.append(f'{name} would fill both {used[name]} and {where}')
        continue
      used[name] = where
      if name not in state_dict:
        problems.append(f'{where} needs {name}, which the file does not have')
        continue
      value = to_cvjax_layout(state_dict[name], keys, cfg)
      if cfg.name == 'vgg' and keys[-1] == 'mean':
        # torchvision's VGG-BN convs keep a bias before BatchNorm, where cvjax's have none.
        # BN(conv + b) with mean m is BN(conv) with mean m - b, in eval and in training
        # (batch statistics absorb b), so the bias folds into the running mean exactly.
        bias = f'features.{int(name.split(".")[1]) - 1}.bias'
        used[bias] = where
        if bias not in state_dict:
          problems.append(f'{where} needs {bias}, which the file does not have')
          continue
        value = value - state_dict[bias]
      if value.shape != tuple(leaf.shape):
        problems.append(f'{name} has shape {state_dict[name].shape} -> {value.shape}, '
                        f'{where} has {tuple(leaf.shape)}')
        continue
      filled[(collection, keys)] = value
  dropped = [] if keep_classifier else [k for k in state_dict if k.startswith(torch_classifier)]
  unused = sorted(k for k in state_dict
                  if k not in used and k not in dropped and not UNUSED_BY_DESIGN.match(k))
  problems += [f'{k} {state_dict[k].shape} in the file matches no cvjax variable' for k in unused]
  if problems:
    raise UserError(f'the weights do not match cvjax\'s {cfg.name} ({len(problems)} problems): '
                    + '; '.join(problems[:8]) + ('; ...' if len(problems) > 8 else '')
                    + '. Check --model (and the config\'s model fields).')
  return filled


def train_state(filled, abstract, tx):
  """The train state at step 0 from the converted arrays; a new last layer starts at zero
  (as big_vision fine-tunes), so nothing is initialised at random and nothing compiled."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cvjax import steps  # pylint: disable=g-import-not-at-top

  def fill(collection):
    def value(path, leaf):
      keys = tuple(str(getattr(k, 'key', k)) for k in path)
      if (collection, keys) in filled:
        return jnp.asarray(filled[(collection, keys)], leaf.dtype)
      if collection == 'params' and keys[0] in CLASSIFIER.values():
        return jnp.zeros(leaf.shape, leaf.dtype)
      raise UserError(f'{collection}/{"/".join(keys)} has no source in the weights file.')
    return value
  params = jax.tree_util.tree_map_with_path(fill('params'), abstract.params)
  model_state = {c: jax.tree_util.tree_map_with_path(fill(c), v)
                 for c, v in abstract.model_state.items()}
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          model_state=model_state, opt_state=tx.init(params),
                          ema=None if abstract.ema is None else {'params': params,
                                                                 'model_state': model_state})


def import_weights(model, weights, workdir, config=None, num_classes=None):
  """Writes WORKDIR/checkpoints/0 and WORKDIR/config.json; returns (fingerprint, path)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from cvjax import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  if model not in SOURCES:
    raise UserError(f'unknown --model={model!r}; expected one of {", ".join(SOURCES)}.')
  if num_classes is not None and num_classes < 1:
    raise UserError(f'--num_classes={num_classes}; expected at least 1 (the classes of the new '
                    'last layer), or leave it out to keep the file\'s.')
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise UserError(f'--workdir={workdir} exists and is not a directory.')
  checkpoints = checkpointing.directory(workdir)
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    raise UserError(f'{checkpoints} is not empty; import into a new --workdir.')
  config = config if config is not None else default_config(model)
  check_model_config(model, config)
  state_dict = load_state_dict(weights)
  bias = torch_name(config.model, (CLASSIFIER[config.model.name], 'bias'))
  source_classes = state_dict[bias].shape[0] if bias in state_dict else None
  num_classes = num_classes or source_classes
  if not num_classes:
    raise UserError(f'--weights has no {bias}: is it a torchvision {model}?')
  size = config.input.image_size or 224  # torchvision's evaluation crop.
  _, _, tx, _, abstract = experiment.build_state(config, num_classes, (size, size, 3),
                                                 total_steps=1)
  filled = convert(state_dict, config.model, {'params': abstract.params, **abstract.model_state},
                   keep_classifier=num_classes == source_classes)

  state = train_state(filled, abstract, tx)
  fingerprint = experiment.fingerprint(config, num_classes, (size, size, 3))
  mngr = checkpointing.manager(workdir, config.train.keep_checkpoints)
  checkpointing.save(mngr, 0, state, fingerprint)
  mngr.wait_until_finished()
  (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return fingerprint, checkpoints / '0'


def main(argv):
  runtime.configure()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every write at INFO.
  try:
    if len(argv) > 1:
      raise UserError(f'unexpected argument(s) {" ".join(argv[1:])}: every option is a flag '
                      'written --name=value.')
    config = _CONFIG.value
    _work_starts()  # From here a checkpoint is written: Ctrl-C is an ordinary interrupt.
    fingerprint, path = import_weights(_MODEL.value, _WEIGHTS.value, _WORKDIR.value, config,
                                    _NUM_CLASSES.value)
  except UserError as e:
    print(f'\ncvjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {path}: {_MODEL.value}, {fingerprint["num_classes"]} classes, input '
        f'{"x".join(map(str, fingerprint["input_shape"]))}; model config '
        f'{json.dumps(fingerprint["model"])}')


if __name__ == '__main__':
  from cvjax import errors  # pylint: disable=g-import-not-at-top
  _work_starts = errors.exit_on_signals_until_work_starts()  # The config file loads first.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _MODEL = flags.DEFINE_enum('model', None, list(SOURCES), 'The torchvision architecture.')
  _WEIGHTS = flags.DEFINE_string('weights', None, 'A torchvision state dict (.pth).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the checkpoint.')
  _NUM_CLASSES = flags.DEFINE_integer(
      'num_classes', None, 'Classes of the new last layer (default: the file\'s); a different '
      'number re-initialises the last layer, for fine-tuning on other classes.')
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'The config the checkpoint is for (default: the model family\'s ImageNet '
      'config with torchvision\'s architecture fields).', lock_config=False)
  flags.mark_flags_as_required(['model', 'weights', 'workdir'])
  app.run(main)
