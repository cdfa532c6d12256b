"""Streaming input for data that does not fit in memory (ImageNet): grain workers decode and
augment JPEGs on the host, a thread puts the batches on the devices ahead of the step.

Two sources give (encoded image, label) records by index: an image folder in the ILSVRC
layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`, or `test/` for `val/`), and tfds
`imagenet2012` prepared as ArrayRecord in `dataset.data_dir`. grain reads them by index, so
the data order is a pure function of (seed, step): a resumed run restarts the stream at its
checkpoint's step and sees the same batches as an uninterrupted one, with no iterator state
to save. Each process decodes only its own part of every global batch.

Train: Inception-style random-resized crop and a horizontal flip (Szegedy et al. 2015,
as torchvision's RandomResizedCrop). Eval: the shorter side resized to image_size / 0.875
(256 for 224) and the centre crop; for 10-crop evaluation the centre square of that size,
which the eval step cuts into corners, centre and flips.
"""

import dataclasses
import functools
import os
import queue
import threading
import time

import numpy as np

from cvjax.data import image_files
from cvjax.errors import UserError

EVAL_CROP_FRACTION = 0.875  # 224 of 256.
MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


# --- sources: (encoded image, label) by index -------------------------------------------

@dataclasses.dataclass
class FolderSource:
  """Files of one split; the paths are one numpy array, so the source pickles to each
  worker process quickly even for 1.28M files."""
  root: str
  paths: np.ndarray  # bytes, relative to root
  labels: np.ndarray  # int32

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    path = os.path.join(self.root, self.paths[i].decode())
    try:
      with open(path, 'rb') as f:
        return {'image': f.read(), 'label': int(self.labels[i]), 'where': path}
    except OSError as e:  # Gone, or unreadable, since the folder was listed.
      raise UserError(f'cannot read image {path}: {e.strerror or e}. Restore or remove the file; '
                      'a re-run resumes from the last checkpoint.') from None


@dataclasses.dataclass
class TfdsSource:
  """A tfds ArrayRecord split read without decoding (the workers decode)."""
  source: object

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    record = self.source[i]
    return {'image': record['image'], 'label': int(record['label']),
            'where': f'record {i} of {self.source}'}

  @functools.cached_property
  def labels(self):  # Reads the split once (for the error analysis at the end of a run).
    return np.array([self.source[i]['label'] for i in range(len(self))], np.int32)


@dataclasses.dataclass
class Splits:
  train: object
  test: object
  class_names: list


def image_folder(root) -> Splits:
  """An ILSVRC-layout folder: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG (or test/); refuses
  what the in-memory loader refuses (cvjax.data.memory): an empty class folder would
  shift the labels of every class after it."""
  listing = image_files.list_image_folder(root)
  problems = [f'class folder {split}/{cls} holds no images'
              for split, classes in listing.items() for cls, paths in classes.items() if not paths]
  files = {split: [(cls, p) for cls, paths in classes.items() for p in paths]
           for split, classes in listing.items()}
  problems += [f'{os.path.join(root, p)} is empty (0 bytes)' for items in files.values()
               for _, p in items if os.path.getsize(os.path.join(root, p)) == 0]
  if problems:
    raise UserError(f'image folder {root}: {"; ".join(problems[:5])}'
                    + (f' (and {len(problems) - 5} more)' if len(problems) > 5 else '')
                    + '. An empty class would be dropped and the labels of the classes after it '
                    'shifted, and an empty file stops the run when it is drawn: add the images, '
                    'or remove the folder or file.')
  test_split = 'val' if 'val' in files else 'test'
  if 'train' not in files or test_split not in files:
    raise UserError(f'image folder {root} needs train/<class>/*.JPEG and val/<class>/*.JPEG '
                    f'(or test/<class>/*), as in the ILSVRC layout; found splits '
                    f'{sorted(files) or "none"}. docs/data.md says how to sort the ILSVRC2012 '
                    'validation images into class folders.')
  class_names = sorted({c for c, _ in files['train']})
  unknown = sorted({c for c, _ in files[test_split]} - set(class_names))
  if unknown:
    raise UserError(f'image folder {root}: {test_split} classes {unknown[:5]} do not occur in '
                    'train/.')
  index = {c: i for i, c in enumerate(class_names)}

  def source(items):
    return FolderSource(os.path.abspath(root), np.array([p.encode() for _, p in items]),
                        np.array([index[c] for c, _ in items], np.int32))
  return Splits(source(files['train']), source(files[test_split]), class_names)


def tfds_imagenet(name, data_dir, download=True) -> Splits:
  """tfds `imagenet2012` (or a variant) prepared as ArrayRecord under `data_dir`; prepares it
  from the manual download when the two ILSVRC2012 archives are there."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  try:
    builder = tfds.builder(name, data_dir=root, file_format='array_record')
  except Exception as e:  # An unknown name or version.
    raise UserError(f'tfds has no dataset {name!r} ({type(e).__name__}: {e}).') from e
  if not builder.is_prepared():
    manual = os.path.join(root, 'downloads', 'manual')
    missing = [f for f in MANUAL_FILES if not os.path.exists(os.path.join(manual, f))]
    if missing or not download:
      raise UserError(
          f'tfds {name!r} is not prepared in dataset.data_dir={root!r}, and ImageNet cannot be '
          'downloaded automatically: register at https://image-net.org/download-images, '
          f'download ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB) and '
          f'put both in {manual}/ (missing: {", ".join(missing) or "none"}); the next run then '
          'prepares the ArrayRecord files once (hours, ~150 GB more disk)'
          + ('' if download else ', with dataset.download=True')
          + '. Or set dataset.path to an image folder in the ILSVRC layout '
          '(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG).')
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning('Preparing tfds %s from %s: this takes hours, once.', name, manual)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
  try:
    sources = {s: builder.as_data_source(split=s, decoders={'image': tfds.decode.SkipDecoding()})
               for s in ('train', 'validation')}
  except Exception as e:  # Prepared as TFRecord: no random access.
    raise UserError(
        f'tfds {name!r} in {root!r} cannot be read by index ({type(e).__name__}: {e}). Streaming '
        'needs the ArrayRecord format: convert a TFRecord copy with `tfds convert_format '
        f'--root_data_dir={root} --out_file_format=array_record`.') from e
  return Splits(TfdsSource(sources['train']), TfdsSource(sources['validation']),
                list(builder.info.features['label'].names))


# --- transforms: run in the worker processes, numpy, PIL and simplejpeg only -----------

THEN = 'a re-run resumes from the last checkpoint.'


def decode(record, scale=1.0, array=False):
  """(RGB PIL image, or with `array` a uint8 array, and its width over the full width): a JPEG
  decoded at the smallest DCT scale that keeps `scale` of each side
  (image_files.decode_scaled)."""
  return image_files.decode_scaled(record['image'], record.get('where', ''), scale, then=THEN,
                                   array=array)


def random_resized_crop_box(rng, width, height, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
  """(left, top, w, h) of a crop covering `area` of the image at aspect ratio (w/h) in
  `aspect`, log-uniform; ten tries, then the centre crop at the nearest allowed ratio
  (Inception's sampling, as torchvision's RandomResizedCrop)."""
  log_aspect = np.log(aspect)
  for _ in range(10):
    target = width * height * rng.uniform(*area)
    ratio = np.exp(rng.uniform(*log_aspect))
    w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  ratio = width / height
  if ratio < aspect[0]:
    w, h = width, int(round(width / aspect[0]))
  elif ratio > aspect[1]:
    w, h = int(round(height * aspect[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(record, rng, *, size, area, aspect, flip, auto_augment='', resize='pil'):
  """Random-resized crop to size x size, `auto_augment` ('trivial_augment_wide':
  data/auto_augment.py) and a random horizontal flip: uint8 HWC. The crop is drawn on the
  header's size; a JPEG is then decoded at the smallest DCT scale at which the crop keeps
  `size` pixels a side (a crop twice `size` or more: half the pixels or fewer to decode).
  `resize`: 'pil' or 'opencv' (`opencv_resize`, input.train_resize)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image_files.size(record['image'], record.get('where', ''), then=THEN)
  left, top, w, h = random_resized_crop_box(rng, width, height, area, aspect)
  img, s = decode(record, size / min(w, h), array=resize == 'opencv')
  if resize == 'opencv':
    box = (left * s, top * s, min((left + w) * s, img.shape[1]), min((top + h) * s, img.shape[0]))
    image = opencv_resize(img, box, size)
    if not auto_augment:
      if flip and rng.random() < 0.5:
        import cv2  # pylint: disable=g-import-not-at-top
        image = cv2.flip(image, 1)  # Left-right; numpy's reversed copy is ~10x slower.
      return {'images': image, 'labels': np.int32(record['label'])}
    img = Image.fromarray(image)
  else:
    box = (left * s, top * s, min((left + w) * s, img.width), min((top + h) * s, img.height))
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if auto_augment:
    from cvjax.data import auto_augment as auto_augment_lib  # pylint: disable=g-import-not-at-top
    img = auto_augment_lib.trivial_augment_wide(img, rng)
  if flip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return {'images': np.asarray(img, np.uint8), 'labels': np.int32(record['label'])}


def opencv_resize(image, box, size):
  """`image`'s region `box` (left, top, right, bottom; fractional pixel edges, rounded to whole
  pixels here: at most half a source pixel from where Pillow's `box=` puts it) resized to
  size x size by OpenCV: bilinear, or its area filter (antialiased) where both sides shrink 2x
  or more. The scaled JPEG decode leaves most crops within 2x of `size`, where bilinear
  aliases little; the area filter takes 0.5 ms a crop on a Zen 4 core, bilinear 0.07 ms."""
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)  # One image per worker thread: OpenCV's own threads only contend.
  x0, y0, x1, y1 = (int(round(v)) for v in box)
  region = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
  area = min(region.shape[:2]) >= 2 * size
  return cv2.resize(region, (size, size),
                    interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)


def resize_size(size):
  return int(round(size / EVAL_CROP_FRACTION))


def eval_transform(record, *, size, crop):
  """Shorter side resized to `size`/0.875 (256 for 224), then the centre crop x crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img, _ = decode(record)
  w, h = img.size
  short = resize_size(size)
  scale = short / min(w, h)
  nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
  img = img.resize((nw, nh), Image.Resampling.BILINEAR)
  left, top = (nw - crop) // 2, (nh - crop) // 2
  image = np.asarray(img.crop((left, top, left + crop, top + crop)), np.uint8)
  return {'images': image, 'labels': np.int32(record['label']), 'mask': np.bool_(True)}


# --- grain pipelines: each process reads its own part of every global batch -------------

def _read_options(threads):
  import grain  # pylint: disable=g-import-not-at-top
  # A prefetch buffer counts whole batches here: keep it small.
  return grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=max(threads, 1) + 1)


def _iterate(ds, workers, threads):
  import grain  # pylint: disable=g-import-not-at-top
  it = ds.to_iter_dataset(_read_options(threads))
  if workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # Used as a library: grain's workers read its flags.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=functools.partial(die_with_parent, parent=os.getpid()))
  return iter(it)


def die_with_parent(worker_index, num_workers, *, parent, poll_seconds=1.0):
  """Runs in each grain worker: exits when `parent`, the process that started it, is gone
  (also if it went while this worker was starting). A kill -9 of the training process leaves
  no one to stop its workers, and each holds a few hundred MB (an ImageNet run starts up to
  16); multiprocessing's resource tracker then ends with them."""
  del worker_index, num_workers

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_seconds)
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name='cvjax-parent-watch').start()


def train_dataset(source, *, seed, batch_size, start_step, transform, process_index=0,
                  process_count=1):
  """Process `process_index`'s part of the global batches from `start_step` on: an endless,
  per-epoch reshuffled stream, cut into batches across epoch ends; batch k, element j
  is a pure function of (seed, k, j)."""
  import grain  # pylint: disable=g-import-not-at-top
  local = batch_size // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.random_map(transform, seed=seed).batch(local, drop_remainder=True)
  # Global batch k = local batches k*P .. k*P+P-1; this process takes its own.
  return ds[start_step * process_count + process_index::process_count]


def eval_dataset(source, *, batch_size, transform, pad_shape, process_index=0,
                 process_count=1):
  """Every example once, in order, the last global batch padded with masked-out zeros."""
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  num_batches = -(-n // batch_size)
  pad = {'images': np.zeros(pad_shape, np.uint8), 'labels': np.int32(0), 'mask': np.bool_(False)}
  ds = grain.MapDataset.range(num_batches * batch_size).map(
      lambda i: transform(source[i]) if i < n else pad)
  return ds.batch(batch_size // process_count)[process_index::process_count]


@dataclasses.dataclass
class EvalImages:
  """test_images[i] decoded on demand, as evaluated (for the figure of mistakes)."""
  source: object
  size: int

  def __len__(self):
    return len(self.source)

  @property
  def shape(self):
    return (len(self.source), self.size, self.size, 3)

  def __getitem__(self, i):
    return eval_transform(self.source[i], size=self.size, crop=self.size)['images']


def make_input(config, mesh):
  """The streaming `Input` for `config`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from cvjax.data import input as data_input  # pylint: disable=g-import-not-at-top
  cfg, inp = config.dataset, config.input
  if cfg.path:
    path = os.path.expanduser(cfg.path)
    if not os.path.isdir(path):
      raise UserError(f'dataset.path={cfg.path!r} is not a folder: streaming reads an image '
                      'folder in the ILSVRC layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG).')
    splits = image_folder(path)
  else:
    splits = tfds_imagenet(cfg.name, cfg.data_dir, cfg.download)
  size = inp.image_size  # It, the normalization and the batches: config_checks.check_pipeline.
  mean, std = data_input.imagenet_stats() if inp.normalization == 'imagenet' else (
      np.zeros((1, 1, 1, 1), np.float32), np.ones((1, 1, 1, 1), np.float32))
  crops = data_input.eval_crops(config)
  process_count, process_index = jax.process_count(), jax.process_index()
  sharding = NamedSharding(mesh, P('data'))
  workers, threads = inp.workers, inp.threads
  area, aspect = tuple(inp.random_crop_area), tuple(inp.random_crop_aspect)
  if workers < 0:  # Every core this process may use but one, left to the training process.
    workers = max(1, host_cores() - 1)
  shard = dict(process_index=process_index, process_count=process_count)

  def stream(ds):
    it = _iterate(ds, workers, threads)
    return prefetch_to_device(it, sharding, close=it.close)

  def train_batches(start_step, seeds=None):
    return stream(train_dataset(
        splits.train, seed=config.seed if seeds is None else seeds,
        batch_size=config.train.batch_size,
        start_step=start_step, **shard, transform=functools.partial(
            train_transform, size=size, area=area, aspect=aspect, flip=inp.flip,
            auto_augment=inp.auto_augment, resize=inp.train_resize)))

  def eval_batches():
    crop = size if crops == 1 else resize_size(size)  # 10 crops: the eval step cuts them.
    return stream(eval_dataset(
        splits.test, batch_size=config.train.eval_batch_size, pad_shape=(crop, crop, 3),
        **shard, transform=functools.partial(eval_transform, size=size, crop=crop)))

  stats = {'mean': mean, 'std': std}
  if isinstance(splits.train, FolderSource):
    fingerprint = data_input.fingerprint(splits.class_names, splits.train.labels,
                                       splits.test.labels)
  else:  # Hashing tfds labels would read the whole dataset: classes and sizes only.
    fingerprint = {'class_names': splits.class_names, 'num_train': len(splits.train),
                'num_test': len(splits.test)}
  return data_input.Input(
      'streaming', len(splits.train), splits.class_names, (size, size, 3), train_data=stats,
      test_data=stats, train_batches=train_batches, eval_batches=eval_batches,
      make_train_batch=train_batch, make_eval_batch=eval_batch,
      test_labels=splits.test.labels, test_images=EvalImages(splits.test, size),
      fingerprint=fingerprint)


def host_cores():
  """The CPU cores this process may run on (a Slurm or container limit counts), not the
  machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows.
    return os.cpu_count() or 2


def train_batch(data, batch, rng, *, sharding, dtype, step=None):
  """The train step's images and labels on streamed data: cropped and flipped by the host
  workers, placed by `prefetch_to_device`, normalised here."""
  from cvjax.data import transforms  # pylint: disable=g-import-not-at-top
  del rng, sharding, step
  return transforms.normalize(batch['images'], data['mean'], data['std'], dtype), batch['labels']


def eval_batch(test, batch, *, sharding, dtype):
  """The eval step's normalised images, labels and mask (of the padding) on streamed data."""
  import jax  # pylint: disable=g-import-not-at-top
  from cvjax.data import transforms  # pylint: disable=g-import-not-at-top
  images = jax.lax.with_sharding_constraint(batch['images'], sharding)
  return (transforms.normalize(images, test['mean'], test['std'], dtype), batch['labels'],
          batch['mask'])


def prefetch_to_device(batches, sharding, size=2, close=None):
  """Yields each host batch as global device arrays (`make_array_from_process_local_data`),
  copied `size` batches ahead from a thread, so the copy overlaps the step and the step
  waits only if the workers fall behind."""
  import jax  # pylint: disable=g-import-not-at-top
  q = queue.Queue(maxsize=size)
  stop = threading.Event()
  end = object()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in batches:
        if not put(jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, x), batch)):
          return
      put(end)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is end:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
    if close is not None:
      close()
