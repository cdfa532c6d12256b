"""The training loop's input: `make_input` picks the pipeline from the dataset
(`dataset.pipeline` forces it). ImageNet and large or mixed-size image folders stream from
disk (data/streaming.py); MNIST/CIFAR-sized data is held on the device (data/memory.py).
Both give the loop the same `Input` (data/input.py). Imported lazily: grain workers import
the streaming module, and need not import jax."""

import os

import numpy as np

from cvjax.data.input import Input, eval_crops, eval_flip, eval_translate  # pylint: disable=unused-import
from cvjax.errors import UserError

# Image folders whose decoded images would take more than this stream from disk.
MEMORY_BUDGET_BYTES = 4 << 30


def pipeline_for(cfg):
  """'memory' or 'streaming' for the config's `dataset` block."""
  mode = cfg.pipeline
  if mode not in ('auto', 'memory', 'streaming'):
    raise UserError(f'dataset.pipeline={mode!r}; expected auto, memory or streaming.')
  if mode != 'auto':
    return mode
  if cfg.name.startswith('imagenet'):
    return 'streaming'
  path = os.path.expanduser(cfg.path) if cfg.path else ''
  if not os.path.isdir(path) or any(f.startswith(('train-images', 't10k-images'))
                                    for f in os.listdir(path)):
    return 'memory'
  from cvjax.data import image_files  # pylint: disable=g-import-not-at-top
  listing = image_files.list_image_folder(path)
  if 'test' not in listing:  # The ILSVRC layout (train/, val/) is streamed.
    return 'streaming' if 'val' in listing else 'memory'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = [[p for paths in classes.values() for p in paths] for classes in listing.values()]
  sample = [items[int(i)] for items in files for i in np.linspace(0, len(items) - 1, 8)]
  sizes = set()
  for p in sample:
    try:
      with Image.open(os.path.join(path, p)) as img:
        sizes.add(img.size)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'cannot read image {os.path.join(path, p)}: {type(e).__name__}: '
                      f'{getattr(e, "strerror", None) or e}. Replace or remove the file.') from None
  count = sum(len(items) for items in files)
  w, h = max(sizes)
  return 'streaming' if len(sizes) > 1 or count * w * h * 3 > MEMORY_BUDGET_BYTES else 'memory'


def make_input(config, mesh) -> Input:
  """The `Input` of the config's pipeline, after the checks that need the pipeline and the
  processes that read their share (config_checks.check_pipeline)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cvjax import config_checks  # pylint: disable=g-import-not-at-top
  pipeline = pipeline_for(config.dataset)
  config_checks.check_pipeline(config, pipeline, jax.process_count())
  if pipeline == 'streaming':
    from cvjax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.make_input(config, mesh)
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  return memory.in_memory_input(config, mesh)
