"""Checks `cvjax.import_weights` against torchvision itself, with no download:

  python -m cvjax.tools.weights_parity --models=resnet18,resnet50,vgg11_bn,alexnet

For each model: a torchvision net with seeded random weights, biases and BatchNorm affine
parameters and running statistics (so a tensor mapped to the wrong place shows), saved as
a .pth state dict, imported into a fresh workdir, restored from the checkpoint as training
and evaluation restore it, and run on the same random images in both frameworks (eval mode).
Prints max |logit difference|, the largest |logit| for scale, and argmax agreement.
"""

import os
import tempfile
import time

import numpy as np

from cvjax import import_weights
from cvjax import runtime

# Smallest inputs torchvision's nets take that keep every layer non-trivial: the ResNets'
# 7x7/2 stem needs 64x64; AlexNet at 127x127 ends on 3x3 maps that the adaptive pool spreads
# to 6x6; cvjax's VGG has no adaptive pool (torchvision's is the identity at 224x224).
IMAGE_SIZE = {**{m: 64 for m in import_weights.SOURCES if m.startswith('resnet')},
              **{m: 224 for m in import_weights.SOURCES if m.startswith('vgg')},
              'alexnet': 127}


def random_torchvision(model, seed=0):
  """torchvision's `model`, randomly initialised from `seed`; BatchNorm and biases made
  non-trivial (torchvision starts them at constants, which would hide a wrong mapping)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  net = getattr(torchvision.models, model)(weights=None)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
        m.bias.uniform_(-0.1, 0.1)  # torchvision's VGG starts them at zero.
  return net.eval()


def restore(workdir, config):
  """The checkpoint in `workdir`, restored as `cvjax.main` and `cvjax.evaluate` restore it."""
  import jax  # pylint: disable=g-import-not-at-top
  from cvjax import checkpointing, experiment  # pylint: disable=g-import-not-at-top
  size = config.input.image_size
  num_classes = 1000
  model, _, _, _, abstract = experiment.build_state(config, num_classes, (size, size, 3), 1)
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = checkpointing.restore_latest(
      checkpointing.manager(workdir, 1),
      checkpointing.abstract_with_sharding(abstract, replicated),
      experiment.fingerprint(config, num_classes, (size, size, 3)), read_only=True)
  return model, state


def compare(model, image_size=None, batch=2, seed=0, folder=None):
  """Imports a random torchvision `model` and runs both; returns a dict of the numbers."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  image_size = image_size or IMAGE_SIZE[model]
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    t0 = time.perf_counter()
    net = random_torchvision(model, seed)
    path = os.path.join(tmp, f'{model}.pth')
    torch.save(net.state_dict(), path)
    config = import_weights.default_config(model)
    config.input.image_size = image_size
    import_weights.import_weights(model, path, os.path.join(tmp, 'run'), config)
    cvjax_model, state = restore(os.path.join(tmp, 'run'), config)
    x = np.random.default_rng(seed).normal(size=(batch, 3, image_size, image_size))
    x = x.astype(np.float32)
    with torch.no_grad():
      expected = net(torch.from_numpy(x)).numpy()
    logits = jax.jit(lambda v, x: cvjax_model.apply(v, x))(
        {'params': state.params, **state.model_state}, x.transpose(0, 2, 3, 1))
    logits = np.asarray(logits)
  return {'model': model, 'input': f'{batch}x{image_size}x{image_size}x3',
          'max_abs_diff': float(np.abs(logits - expected).max()),
          'max_abs_logit': float(np.abs(expected).max()),
          'argmax_agree': int(np.sum(logits.argmax(-1) == expected.argmax(-1))), 'batch': batch,
          'seconds': time.perf_counter() - t0}


def main(argv):
  runtime.configure()
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO.
  print('| model | input | max abs logit difference | max abs logit | argmax agreement | '
        'seconds |', flush=True)
  print('|---|---|---:|---:|---:|---:|', flush=True)
  for model in _MODELS.value:  # A row as soon as it is measured.
    r = compare(model, batch=_BATCH.value)
    print(f'| {r["model"]} | {r["input"]} | {r["max_abs_diff"]:.2e} | {r["max_abs_logit"]:.3g} | '
          f'{r["argmax_agree"]}/{r["batch"]} | {r["seconds"]:.0f} |', flush=True)
  print('seconds: building, saving, importing, restoring and running both nets.')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _MODELS = flags.DEFINE_list('models', list(import_weights.SOURCES), 'torchvision models.')
  _BATCH = flags.DEFINE_integer('batch', 4, 'Random images per model.')
  app.run(main)
