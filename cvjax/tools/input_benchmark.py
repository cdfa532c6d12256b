"""Throughput of the streaming input pipeline (host only: decode, crop, resize, batch).

  python -m cvjax.tools.input_benchmark --make_imagenet_like=/tmp/imagenet_like \
      --source=cifar10.tar.gz
  python -m cvjax.tools.input_benchmark --data=/tmp/imagenet_like --workers=0,1,2

The first command writes an ImageNet-like folder (ILSVRC layout, real JPEGs): CIFAR-10's
images upsampled to ImageNet's typical ~400x350 at random sizes, ten wnid-named classes. The
second prints images/s for the train transform (random-resized crop, flip) and the eval
transform (resize, centre crop) per worker-process count, and a JSON line per row; with 0
workers also images per CPU-second of the one process (the per-core rate, which a loaded
machine leaves nearly as it is). `train_pil` is the train transform as it was before the
scaled JPEG decode (PIL, full size), timed in the same run. The first batch (worker start-up)
is timed apart from the steady state. `--compare=FOLDER` (a copy of --data made by
`python -m cvjax.data.preresize`) adds a `train_cmp` row per count: the same train transform
reading FOLDER's images, timed in the same run beside --data's. Rows ending `_cv` resize with
OpenCV (input.train_resize=opencv) instead of Pillow.
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
_COMPARE = flags.DEFINE_string(
    'compare', None, 'A second image folder (e.g. a pre-resized copy of --data) whose train '
    'transform is timed beside --data\'s.')
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


def pil_train_transform(record, rng, *, size, area, aspect, flip):
  """The train transform before the scaled decode: PIL decodes the full image (the baseline)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cvjax.data import image_files  # pylint: disable=g-import-not-at-top
  img = image_files.decode(record['image'], record.get('where', ''))
  left, top, w, h = streaming.random_resized_crop_box(rng, *img.size, area, aspect)
  img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  image = np.asarray(img, np.uint8)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {'images': np.ascontiguousarray(image), 'labels': np.int32(record['label'])}


def time_pipeline(ds, workers, threads, batches):
  """(seconds to the first batch, steady-state images/s over `batches` more, images per
  CPU-second of this process: the per-core rate where it does all the work, workers=0)."""
  t0 = time.perf_counter()
  it = streaming._iterate(ds, workers, threads)  # pylint: disable=protected-access
  first = next(it)
  t1, c1 = time.perf_counter(), time.process_time()
  n = 0
  for _ in range(batches):
    n += len(next(it)['labels'])
  t2, c2 = time.perf_counter(), time.process_time()
  it.close()
  del first
  return t1 - t0, n / (t2 - t1), n / max(c2 - c1, 1e-9)


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
  crop = dict(size=size, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), flip=True)
  train, train_pil = (streaming.train_dataset(
      splits.train, seed=0, batch_size=_BATCH.value, start_step=0,
      transform=functools.partial(fn, **crop))
                      for fn in (streaming.train_transform, pil_train_transform))
  rows = [('train_pil', train_pil), ('train', train)]
  sources = [('train', splits.train)]
  if _COMPARE.value:
    sources.append(('train_cmp', streaming.image_folder(_COMPARE.value).train))
  for name, source in sources:
    for resize in ('pil', 'opencv')[name == 'train':]:
      rows.append((name + ('_cv' if resize == 'opencv' else ''), streaming.train_dataset(
          source, seed=0, batch_size=_BATCH.value, start_step=0, transform=functools.partial(
              streaming.train_transform, **crop, resize=resize))))
  evaluation = streaming.eval_dataset(
      splits.test, batch_size=_BATCH.value, pad_shape=(size, size, 3),
      transform=functools.partial(streaming.eval_transform, size=size, crop=size))
  print(f'{len(splits.train)} train / {len(splits.test)} val images in {_DATA.value}; '
        f'batch {_BATCH.value}, {size}x{size}, {_THREADS.value} thread(s) per process, '
        f'{os.cpu_count()} CPUs')
  print(f'{"transform":<14}{"workers":>8}{"first batch s":>15}{"images/s":>10}'
        f'{"per CPU-s":>11}')
  for workers in map(int, _WORKERS.value):
    for name, ds in (*rows, ('eval', evaluation)):
      batches = min(_BATCHES.value, len(ds) - 1) if name == 'eval' else _BATCHES.value
      first, ips, per_cpu = time_pipeline(ds, workers, _THREADS.value, batches)
      per_cpu = round(per_cpu, 1) if workers == 0 else None  # Workers' CPU is not counted.
      print(f'{name:<14}{workers:>8}{first:>15.2f}{ips:>10.0f}{per_cpu or "-":>11}')
      print(json.dumps({'transform': name, 'workers': workers, 'threads': _THREADS.value,
                        'batch_size': _BATCH.value, 'first_batch_s': round(first, 3),
                        'images_per_s': round(ips, 1), 'images_per_cpu_s': per_cpu}))


if __name__ == '__main__':
  app.run(main)
