"""Throughput of the streaming input pipeline (host only: decode, crop, resize, batch).

  python -m cvjax.tools.input_benchmark --make_imagenet_like=/tmp/imagenet_like \
      --source=cifar10.tar.gz
  python -m cvjax.tools.input_benchmark --data=/tmp/imagenet_like --workers=0,1,2

The first command writes an ImageNet-like folder (ILSVRC layout, real JPEGs): CIFAR-10's
images upsampled to ImageNet's typical ~400x350 at random sizes, ten wnid-named classes. The
second prints images/s for the train transform (random-resized crop, flip) and the eval
transform (resize, centre crop) per worker-process count, and a JSON line per row. The
first batch (worker start-up) is timed apart from the steady state.
"""

import json
import os
import tarfile
import time

from absl import app
from absl import flags
import numpy as np

from cvjax.data import streaming
from cvjax import runtime

_DATA = flags.DEFINE_string('data', None, 'An image folder in the ILSVRC layout.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker-process counts to time.')
_THREADS = flags.DEFINE_integer('threads', 1, 'Reading threads per process.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per batch.')
_BATCHES = flags.DEFINE_integer('batches', 16, 'Batches timed after the first.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Crop size.')
_MAKE = flags.DEFINE_string('make_imagenet_like', None, 'Write an ImageNet-like folder here.')
_SOURCE = flags.DEFINE_string('source', 'cifar10.tar.gz',
                              'Image-folder .tar.gz to upsample (with --make_imagenet_like).')
_TRAIN_PER_CLASS = flags.DEFINE_integer('train_per_class', 300, 'With --make_imagenet_like.')
_VAL_PER_CLASS = flags.DEFINE_integer('val_per_class', 50, 'With --make_imagenet_like.')

# ImageNet classes near CIFAR-10's, so the folder reads like ILSVRC.
WNIDS = {'airplane': 'n02690373', 'automobile': 'n02814533', 'bird': 'n01530575',
         'cat': 'n02123045', 'deer': 'n02423022', 'dog': 'n02085620', 'frog': 'n01641577',
         'horse': 'n02389026', 'ship': 'n03095699', 'truck': 'n04467665'}


def make_imagenet_like(source, out, train_per_class, val_per_class, seed=0):
  """Upsamples the first images of each class of an image-folder archive to random sizes
  around 400x350 and writes them as JPEGs in the ILSVRC layout."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  want = {'train': train_per_class, 'test': val_per_class}
  counts = {}
  with tarfile.open(source) as tar:
    for member in tar:
      parts = member.name.split('/')
      if not member.isfile() or len(parts) < 3 or parts[-3] not in want:
        continue
      split, cls = parts[-3], parts[-2]
      key = (split, cls)
      if counts.get(key, 0) >= want[split]:
        continue
      img = Image.open(tar.extractfile(member)).convert('RGB')
      size = (int(rng.integers(300, 501)), int(rng.integers(250, 451)))
      wnid = WNIDS.get(cls, cls)
      folder = os.path.join(out, 'train' if split == 'train' else 'val', wnid)
      os.makedirs(folder, exist_ok=True)
      i = counts[key] = counts.get(key, 0) + 1
      name = f'{wnid}_{i}.JPEG' if split == 'train' else f'ILSVRC2012_val_{cls}_{i:05d}.JPEG'
      img.resize(size, Image.Resampling.BICUBIC).save(os.path.join(folder, name), quality=90)
  return counts


def time_pipeline(ds, workers, threads, batches):
  """(seconds to the first batch, steady-state images/s over `batches` more)."""
  t0 = time.perf_counter()
  it = streaming._iterate(ds, workers, threads)  # pylint: disable=protected-access
  first = next(it)
  t1 = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(next(it)['labels'])
  t2 = time.perf_counter()
  it.close()
  del first
  return t1 - t0, n / (t2 - t1)


def main(argv):
  runtime.configure()
  del argv
  if _MAKE.value:
    counts = make_imagenet_like(_SOURCE.value, _MAKE.value, _TRAIN_PER_CLASS.value,
                                _VAL_PER_CLASS.value)
    print(f'wrote {sum(counts.values())} JPEGs to {_MAKE.value}')
    return
  if not _DATA.value:
    raise app.UsageError('pass --data=FOLDER (or --make_imagenet_like=FOLDER).')
  splits = streaming.image_folder(_DATA.value)
  size = _SIZE.value
  import functools  # pylint: disable=g-import-not-at-top
  train = streaming.train_dataset(
      splits.train, seed=0, batch_size=_BATCH.value, start_step=0,
      transform=functools.partial(streaming.train_transform, size=size, area=(0.08, 1.0),
                                  aspect=(3 / 4, 4 / 3), flip=True))
  evaluation = streaming.eval_dataset(
      splits.test, batch_size=_BATCH.value, pad_shape=(size, size, 3),
      transform=functools.partial(streaming.eval_transform, size=size, crop=size))
  print(f'{len(splits.train)} train / {len(splits.test)} val images in {_DATA.value}; '
        f'batch {_BATCH.value}, {size}x{size}, {_THREADS.value} thread(s) per process, '
        f'{os.cpu_count()} CPUs')
  print(f'{"transform":<10}{"workers":>8}{"first batch s":>15}{"images/s":>10}')
  for workers in map(int, _WORKERS.value):
    for name, ds in (('train', train), ('eval', evaluation)):
      batches = min(_BATCHES.value, len(ds) - 1) if name == 'eval' else _BATCHES.value
      first, ips = time_pipeline(ds, workers, _THREADS.value, batches)
      print(f'{name:<10}{workers:>8}{first:>15.2f}{ips:>10.0f}')
      print(json.dumps({'transform': name, 'workers': workers, 'threads': _THREADS.value,
                        'batch_size': _BATCH.value, 'first_batch_s': round(first, 3),
                        'images_per_s': round(ips, 1)}))


if __name__ == '__main__':
  app.run(main)
