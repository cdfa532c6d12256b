"""The in-memory pipeline: datasets held as uint8 NHWC arrays on the device, with
augmentation that runs inside jit.

Three sources give the same in-memory `Dataset`: tensorflow-datasets by name, a folder of
MNIST-style IDX files, and an image folder (`train/<class>/*`, `test/<class>/*`, as a
directory or a .tar.gz). MNIST/CIFAR-sized data fits in memory many times over, so the whole
split lives on the device and each step gathers its batch there: the input can never starve
the step.
"""

import dataclasses
import functools
import gzip
import hashlib
import itertools
import json
import os
import re
import struct
import tarfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cvjax import config_checks
from cvjax import runtime
from cvjax.data import image_files
from cvjax.data import transforms
from cvjax.data.input import Input, fingerprint, imagenet_stats
from cvjax.errors import UserError

# Small real datasets shipped in cvjax/data/embedded (its README says where they come from):
# `dataset.name` alone reads them, offline.
EMBEDDED_DATASETS = {'mnist10k': 'mnist10k', 'cifar10_6k': 'cifar10_6k.tar.gz'}
# Datasets small enough to hold in memory, by tfds name.
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'kmnist', 'emnist/digits', 'emnist/letters',
                 'cifar10', 'cifar100', 'svhn_cropped')

CLASS_NAMES = {
    'fashion_mnist': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                      'Sneaker', 'Bag', 'Ankle boot'],
}

IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte', 'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte', 'test_labels': 't10k-labels-idx1-ubyte',
}
# What the tfds datasets hold: (image shape, number of classes), to catch a dataset.name
# that contradicts the data at dataset.path.
KNOWN_SHAPES = {'mnist': ((28, 28, 1), 10), 'fashion_mnist': ((28, 28, 1), 10),
                'kmnist': ((28, 28, 1), 10), 'emnist/digits': ((28, 28, 1), 10),
                'cifar10': ((32, 32, 3), 10), 'cifar100': ((32, 32, 3), 100),
                'svhn_cropped': ((32, 32, 3), 10), 'mnist10k': ((28, 28, 1), 10),
                'cifar10_6k': ((32, 32, 3), 10)}


def in_memory_input(config, mesh) -> Input:
  """The whole dataset on the device; each train batch the indices of its examples in it (on
  the host: the loop places them), each eval batch the index of a slice of the padded test set."""
  data = load(config.dataset)
  config_checks.check_data(config, image_shape=data.train_images.shape[1:])
  train_images = pad_to(data.train_images, config.input.image_size)
  test_images = pad_to(data.test_images, config.input.image_size)
  mean, std = normalization_stats(train_images, config.input.normalization)
  batch_size, n = config.train.batch_size, len(train_images)
  eval_size = config.train.eval_batch_size
  num_eval_batches = -(-len(test_images) // eval_size)
  padded = num_eval_batches * eval_size - len(test_images)  # Padded, then masked out.
  del mesh  # The loop places the train batches (cvjax/train.py), the eval step its slices.

  per_epoch, permutations = n // batch_size, {}

  def train_indices(seed, step):
    """The examples of `step` in the data order of `seed`: a function of the two only."""
    epoch = step // per_epoch
    if permutations.get(seed, (None,))[0] != epoch:  # One epoch's order per seed kept.
      permutations[seed] = epoch, epoch_permutation(seed, epoch, n)
    i = step % per_epoch
    return permutations[seed][1][i * batch_size:(i + 1) * batch_size]

  def rows(seeds, step):
    if not seeds.ndim:
      return train_indices(int(seeds), step)
    return np.stack([train_indices(int(s), step) for s in seeds.ravel()]).reshape(
        *seeds.shape, batch_size)

  def train_batches(start_step, seeds=None):
    # On the host: every process computes the same global indices, and placing them keeps the
    # rows of its own devices, so the batch and its order do not depend on the process count.
    seeds = jax.tree.map(np.asarray, config.seed if seeds is None else seeds)
    for step in itertools.count(start_step):
      yield jax.tree.map(lambda s, step=step: {'indices': rows(s, step)}, seeds)

  def eval_batches():
    return ({'index': np.int32(i)} for i in range(num_eval_batches))

  return Input(
      'memory', n, data.class_names, train_images.shape[1:],
      train_data={'train_images': train_images, 'train_labels': data.train_labels,
                  'mean': mean, 'std': std},
      test_data={'images': np.pad(test_images, ((0, padded), (0, 0), (0, 0), (0, 0))),
                 'labels': np.pad(data.test_labels, (0, padded)),
                 'mask': np.pad(np.ones(len(test_images), np.bool_), (0, padded)),
                 'mean': mean, 'std': std},
      train_batches=train_batches, eval_batches=eval_batches, make_train_batch=functools.partial(
          train_batch, crop_padding=config.input.crop_padding, flip=config.input.flip,
          pad_mode=config.input.crop_pad_mode,
          alternate_flip_epoch=per_epoch if config.input.alternate_flip else 0),
      make_eval_batch=functools.partial(eval_batch, batch_size=eval_size),
      test_labels=data.test_labels, train_indices=train_indices,
      test_images=test_images,
      fingerprint=fingerprint(data.class_names, data.train_labels, data.test_labels),
      eval_padding=config.input.crop_padding)


@dataclasses.dataclass
class Dataset:
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: list

  @property
  def num_classes(self):
    return len(self.class_names)


EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embedded')


def embedded_path(name):
  """Where the embedded dataset `name` lies inside the installed package."""
  return os.path.join(EMBEDDED_DIR, EMBEDDED_DATASETS[name])


_VERIFIED = {}  # (path, size, mtime_ns) -> sha256: each shipped file is hashed once a process.


def check_embedded(name):
  """Refuses a shipped dataset whose files differ from the sha256 sums its README lists (a
  changed label file would otherwise train silently). Hashing 2 MB takes milliseconds, and
  a file is hashed again only when its size or modification time changes."""
  readme = os.path.join(EMBEDDED_DIR, 'README.md')
  try:
    with open(readme, encoding='utf-8') as f:
      listed = dict(re.findall(r'\| `([\w/.-]+)` \| `([0-9a-f]{64})` \|', f.read()))
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read {readme}, which lists the sha256 sums of the datasets that '
                    f'ship with cvjax ({e}); reinstall cvjax.') from e
  root = EMBEDDED_DATASETS[name]
  files = {k: v for k, v in listed.items() if k == root or k.startswith(root + '/')}
  if not files:
    raise UserError(f'{readme} lists no sha256 sum for the shipped dataset {name!r} '
                    f'({root}); reinstall cvjax.')
  for rel, expected in sorted(files.items()):
    path = os.path.join(EMBEDDED_DIR, rel)
    try:
      st = os.stat(path)
      key = (path, st.st_size, st.st_mtime_ns)
      got = _VERIFIED.get(key) or _file_digest(path)
    except OSError as e:
      raise UserError(f'the shipped dataset {name!r} lacks {path} ({e.strerror}); reinstall '
                      'cvjax, or rebuild the file with cvjax/data/embedded/build.py.') from e
    if got != expected:
      raise UserError(f'the shipped dataset file {path} has sha256 {got}, but its README lists '
                      f'{expected}: the file was changed or damaged, and training on it would '
                      'not be the documented dataset. Reinstall cvjax (or git checkout the '
                      'file), or rebuild it with cvjax/data/embedded/build.py.')
    _VERIFIED[key] = got


def load(cfg) -> Dataset:
  """Loads `cfg` (the config's `dataset` block) from local files, the embedded data or tfds."""
  if cfg.path:
    data = load_local(cfg.path, cfg.name)
    check_name_matches_path(cfg.name, cfg.path, data)
  elif cfg.name in EMBEDDED_DATASETS:
    check_embedded(cfg.name)
    data = load_local(embedded_path(cfg.name), cfg.name)
  else:
    data = load_tfds(cfg.name, cfg.data_dir or None, cfg.download)
  for split in ('train', 'test'):
    labels = getattr(data, f'{split}_labels')
    if len(labels) == 0:
      raise UserError(f'the {split} split of dataset {cfg.path or cfg.name!r} is empty.')
    if labels.min() < 0 or labels.max() >= data.num_classes:
      raise UserError(f'{split} labels of {cfg.path or cfg.name!r} lie in [{labels.min()}, '
                      f'{labels.max()}], outside the {data.num_classes} classes.')
  if data.train_images.shape[1:] != data.test_images.shape[1:]:
    raise UserError(f'train images are {data.train_images.shape[1:]} but test images are '
                    f'{data.test_images.shape[1:]} in {cfg.path or cfg.name!r}.')
  return data


def check_name_matches_path(name, path, data):
  """With dataset.path set the data comes from the path and dataset.name only names it
  (class names, config.json); say so when the two disagree."""
  def norm(text):
    return ''.join(c for c in text.lower() if c.isalnum())
  problems = []
  shape, classes = KNOWN_SHAPES.get(name, (None, None))
  got = data.train_images.shape[1:]
  if shape and (got != shape or data.num_classes != classes):
    problems.append(f'{name} has {classes} classes of {shape} images, but the data at the path '
                    f'has {data.num_classes} classes of {got} images')
  named = [k for k in KNOWN_SHAPES if norm(k) in norm(os.path.basename(path.rstrip('/')))]
  if name and named and norm(max(named, key=len)) != norm(name):
    problems.append(f'the path names {max(named, key=len)}')
  if problems:
    logging.warning('dataset.name=%r disagrees with dataset.path=%r: %s. The data is read from '
                    'dataset.path; set dataset.name to what it holds (or to \'\') so the run '
                    'records it truthfully.', name, path, '; '.join(problems))


# --- tensorflow-datasets ---------------------------------------------------------------

def load_tfds(name, data_dir=None, download=True) -> Dataset:
  if name.startswith('imagenet'):
    raise UserError(f'dataset.name={name!r} is too large to hold in memory: set '
                    'dataset.pipeline=streaming (or auto).')
  if name not in TFDS_DATASETS:
    raise UserError(f'unknown dataset.name={name!r}. Supported tfds datasets (held in memory): '
                    f'{", ".join(TFDS_DATASETS)}; shipped with cvjax (offline): '
                    f'{", ".join(EMBEDDED_DATASETS)}. For other data set dataset.path to a '
                    'folder of IDX files or an image folder (train/<class>/*, test/<class>/*).')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # Keep TensorFlow off the accelerator.

  builder = tfds.builder(name, data_dir=data_dir)
  try:
    if download and not builder.is_prepared():
      _check_online()
      builder.download_and_prepare()
    splits = {s: builder.as_dataset(split=s) for s in ('train', 'test')}
  except Exception as e:  # Network, missing files, or a partial download.
    raise UserError(
        f'tfds dataset {name!r} is not available in data_dir={builder.data_dir!r} and could not '
        f'be downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). Offline, '
        f'use a dataset shipped with cvjax (dataset.name={" or ".join(EMBEDDED_DATASETS)}), '
        'point dataset.data_dir at a folder with the prepared tfds data, or dataset.path at local '
        'raw files: a folder with the four MNIST IDX .gz files, or an image folder '
        '(train/<class>/*, test/<class>/*) or its .tar.gz.') from e
  arrays = {}
  for split, ds in splits.items():
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(4096)):
      images.append(batch['image'])
      labels.append(batch['label'])
    arrays[split] = (np.concatenate(images).astype(np.uint8),
                     np.concatenate(labels).astype(np.int32))
  label = builder.info.features['label']
  return Dataset(*arrays['train'], *arrays['test'], class_names=list(label.names))


def _check_online(host='storage.googleapis.com'):
  """Fails fast offline: tfds would otherwise retry its downloads for minutes."""
  import socket  # pylint: disable=g-import-not-at-top
  try:
    socket.getaddrinfo(host, 443)
  except OSError as e:
    raise ConnectionError(f'no network: cannot resolve {host}') from e


# --- local files -----------------------------------------------------------------------

def load_local(path, name='') -> Dataset:
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise UserError(f'dataset.path={path!r} does not exist. Expected a folder with the four '
                    'MNIST-style IDX files, or an image folder (train/<class>/*, test/<class>/*) '
                    'or its .tar.gz.')
  if os.path.isfile(path):
    if path.endswith(('.tar.gz', '.tgz', '.tar')):
      return decoded_cache(path, _file_digest(path), load_image_folder_tar)
    raise UserError(f'dataset.path={path!r} is a file but not a .tar.gz/.tgz/.tar archive.')
  names = set(os.listdir(path))
  if any(f.startswith(('train-images', 't10k-images')) for f in names):
    return load_idx_folder(path, name)
  return decoded_cache(path, _listing_digest(path), load_image_folder)


# --- decoded image folders, cached -------------------------------------------------------
# Decoding CIFAR-10's 60k JPEGs takes 8-25 s; its decoded arrays load in a fraction of a
# second. Cached under $CVJAX_CACHE_DIR (default ~/.cache/cvjax), keyed by the archive's
# content or the folder's file listing (names, sizes, modification times).

CACHE_VERSION = 1  # Bump when decoding changes, so old entries are not used.


def _file_digest(path):
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _listing_digest(root):
  h = hashlib.sha256()
  for dirpath, dirnames, fnames in os.walk(root):
    dirnames.sort()
    h.update(f'{os.path.relpath(dirpath, root)}/\n'.encode())  # Empty class folders count.
    for fname in sorted(fnames):
      st = os.stat(os.path.join(dirpath, fname))
      h.update(f'{os.path.relpath(os.path.join(dirpath, fname), root)}\0{st.st_size}\0'
               f'{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()


def decoded_cache(path, digest, decode):
  """`decode(path)`, or its arrays from the cache written by an earlier run on the same data."""
  entry = os.path.join(runtime.cache_dir(), 'datasets', f'{digest[:32]}-v{CACHE_VERSION}.npz')
  if os.path.exists(entry):
    try:
      with np.load(entry) as z:
        return Dataset(z['train_images'], z['train_labels'], z['test_images'], z['test_labels'],
                       class_names=json.loads(str(z['class_names'])))
    except (OSError, ValueError, KeyError, EOFError) as e:  # Torn or stale: decode again.
      logging.warning('Ignoring the unreadable dataset cache %s (%s).', entry, e)
  logging.info('Decoding the images of %s (once: the arrays are cached in %s).', path,
               os.path.dirname(entry))
  data = decode(path)
  try:
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    tmp = f'{entry}.{os.getpid()}.tmp.npz'
    np.savez(tmp, train_images=data.train_images, train_labels=data.train_labels,
             test_images=data.test_images, test_labels=data.test_labels,
             class_names=json.dumps(data.class_names))
    os.replace(tmp, entry)  # Atomic: a concurrent run reads either nothing or all of it.
  except OSError as e:  # A read-only or full disk is no reason to stop training.
    logging.warning('Could not cache the decoded dataset in %s: %s', entry, e)
    if os.path.exists(tmp):
      os.remove(tmp)
  return data


def _read_idx(path, magic, ndim):
  """Reads one IDX file (optionally gzipped); checks magic number and size."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise UserError(f'cannot read IDX file {path}: {e}') from e
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise UserError(f'{path} is too short to be an IDX file ({len(raw)} bytes).')
  got_magic, *dims = struct.unpack(f'>{1 + ndim}I', raw[:header])
  if got_magic != magic:
    raise UserError(f'{path} has IDX magic number {got_magic}, expected {magic} '
                    f'({"images" if ndim == 3 else "labels"}, big-endian uint32 header).')
  expected = int(np.prod(dims))
  if len(raw) - header != expected:
    raise UserError(f'{path}: header says {dims} ({expected} bytes of data) but the file holds '
                    f'{len(raw) - header} bytes after the header; the file is truncated or corrupt.')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_idx_folder(path, name='') -> Dataset:
  """The MNIST layout: train-/t10k- images-idx3-ubyte and labels-idx1-ubyte, .gz or raw."""
  arrays = {}
  for key, stem in IDX_FILES.items():
    for fname in (stem + '.gz', stem):
      if os.path.exists(os.path.join(path, fname)):
        break
    else:
      raise UserError(f'{path} lacks {stem}.gz. An IDX dataset folder holds the four MNIST files: '
                      f'{", ".join(s + ".gz" for s in IDX_FILES.values())}.')
    is_images = key.endswith('images')
    arrays[key] = _read_idx(os.path.join(path, fname), 2051 if is_images else 2049,
                            3 if is_images else 1)
  for split in ('train', 'test'):
    n_img, n_lab = len(arrays[f'{split}_images']), len(arrays[f'{split}_labels'])
    if n_img != n_lab:
      raise UserError(f'{path}: {split} split has {n_img} images but {n_lab} labels.')
  labels = np.concatenate([arrays['train_labels'], arrays['test_labels']])
  num_classes = int(labels.max()) + 1
  declared = len(CLASS_NAMES.get(name, [])) or KNOWN_SHAPES.get(name, (None, 0))[1]
  used = len(np.unique(labels))
  # IDX files do not declare their classes: a known dataset.name does; otherwise labels
  # that leave most of 0..max unused are not class indices (e.g. a stray 200 among 0-9).
  if (declared and num_classes > declared) or (not declared and used < num_classes / 2):
    split = 'train' if arrays['train_labels'].max() == num_classes - 1 else 'test'
    where = int(np.argmax(arrays[f'{split}_labels'] == num_classes - 1))
    expected = (f'dataset.name={name!r} has {declared} classes' if declared else
                f'only {used} distinct labels occur, so most of 0..{num_classes - 1} would be '
                'classes without examples')
    raise UserError(
        f'{path}: {split} example {where} has label {num_classes - 1}, but {expected}. IDX '
        'labels are class indices 0..K-1; a stray large label is a corrupt file or another '
        'dataset\'s labels (set dataset.name to the dataset the files hold).')
  names = CLASS_NAMES.get(name, [])
  names = names or [str(i) for i in range(num_classes)]
  return Dataset(arrays['train_images'][..., None], arrays['train_labels'].astype(np.int32),
                 arrays['test_images'][..., None], arrays['test_labels'].astype(np.int32),
                 class_names=names)


def _decode(data, where):
  arr = np.asarray(image_files.decode(data, where, grey=True), np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def _stack(files_by_split, root, class_dirs=()):
  """{split: [(class, where, bytes)]} -> Dataset, with sorted class names as labels.
  `class_dirs`: every (split, class) folder seen; one without images is an error."""
  empty = sorted(set(class_dirs) - {(split, c) for split, items in files_by_split.items()
                                    for c, _, _ in items})
  if empty:
    raise UserError(f'image folder {root}: class folder(s) '
                    f'{", ".join(f"{split}/{c}" for split, c in empty)} hold no images '
                    f'({", ".join(image_files.IMAGE_EXTENSIONS)}). An empty class would be '
                    'dropped and the labels of the classes after it shifted: add its images or '
                    'remove it.')
  for split in ('train', 'test'):
    if not files_by_split.get(split):
      raise UserError(f'image folder {root} has no images under {split}/<class>/. Expected '
                      f'{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg (or the same '
                      'under one top-level folder).')
  class_names = sorted({c for c, _, _ in files_by_split['train']})
  unknown = sorted({c for c, _, _ in files_by_split['test']} - set(class_names))
  if unknown:
    raise UserError(f'image folder {root}: test classes {unknown} do not occur in train/.')
  index = {c: i for i, c in enumerate(class_names)}
  out = []
  for split in ('train', 'test'):
    items = sorted(files_by_split[split], key=lambda t: t[1])
    images = [_decode(data, where) for _, where, data in items]
    shape = images[0].shape
    for img, (_, where, _) in zip(images, items):
      if img.shape != shape:
        raise UserError(f'image folder {root}: {where} is {img.shape}, but {items[0][1]} is '
                        f'{shape}; all images must have the same size.')
    out += [np.stack(images), np.array([index[c] for c, _, _ in items], np.int32)]
  return Dataset(*out, class_names=class_names)


def _split_class(relpath):
  """'x/train/cat/1.jpg' or 'train/cat/1.jpg' -> ('train', 'cat'), else None."""
  parts = relpath.replace(os.sep, '/').split('/')
  if not image_files.is_image(parts[-1]) or len(parts) < 3:
    return None
  split, cls = parts[-3], parts[-2]
  return (split, cls) if split in ('train', 'test') and len(parts) <= 4 else None


def _class_dir(relpath):
  """'x/train/cat' or 'train/cat' -> ('train', 'cat'), else None."""
  parts = relpath.replace(os.sep, '/').strip('/').split('/')
  return (parts[-2], parts[-1]) if 2 <= len(parts) <= 3 and parts[-2] in ('train', 'test') \
      else None


def load_image_folder(root) -> Dataset:
  files, class_dirs = {'train': [], 'test': []}, set()
  for split, classes in image_files.list_image_folder(root, splits=('train', 'test')).items():
    for cls, paths in classes.items():
      class_dirs.add((split, cls))
      for path in paths:
        full = os.path.join(root, path)
        try:
          with open(full, 'rb') as f:
            files[split].append((cls, full, f.read()))
        except OSError as e:  # Gone or unreadable since it was listed.
          raise UserError(f'cannot read image {full}: {e.strerror or e}.') from None
  return _stack(files, root, class_dirs)


def load_image_folder_tar(path) -> Dataset:
  files, class_dirs = {'train': [], 'test': []}, set()
  try:
    with tarfile.open(path) as tar:
      for member in tar:
        if member.isdir() and _class_dir(member.name):
          class_dirs.add(_class_dir(member.name))
        key = _split_class(member.name) if member.isfile() else None
        if key:
          files[key[0]].append((key[1], f'{path}:{member.name}', tar.extractfile(member).read()))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise UserError(f'cannot read archive {path}: {e}') from e
  return _stack(files, path, class_dirs)


# --- preprocessing (host, once) and the step's batch (device, data/transforms.py) ----------

def pad_to(images, size):
  """Zero-pads (centred) to size x size, e.g. 28x28 MNIST to LeNet-5's 32x32."""
  h, w = images.shape[1:3]
  if not size or (h, w) == (size, size):  # A smaller size: config_checks.check_data.
    return images
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def normalization_stats(train_images, mode):
  """(mean, std) in [0, 1] units and broadcastable to NHWC, computed once from train."""
  x = train_images.astype(np.float64) / 255.0
  ones = np.ones((1, 1, 1, 1), np.float32)
  if mode == 'per_pixel_mean':  # He et al. 2015: subtract the mean image.
    return x.mean(axis=0, keepdims=True).astype(np.float32), ones
  if mode == 'per_channel':  # Standardise each channel.
    return (x.mean(axis=(0, 1, 2), keepdims=True).astype(np.float32),
            x.std(axis=(0, 1, 2), keepdims=True).astype(np.float32))
  if mode == 'imagenet':  # ImageNet's per-channel statistics (torchvision's).
    return imagenet_stats()
  if mode == 'none':
    return 0 * ones, ones
  raise UserError(f'unknown input.normalization={mode!r}; expected per_pixel_mean, '
                  'per_channel, imagenet or none.')


def train_batch(data, batch, rng, *, crop_padding, flip, sharding, dtype, pad_mode='constant',
                alternate_flip_epoch=0, step=None):
  """The train step's images and labels on in-memory data: the batch's examples gathered from
  the device-resident split (`batch['indices']`), normalised, randomly cropped and flipped.
  `alternate_flip_epoch` (steps per epoch; 0: off): `alternate_flips` at train `step`."""
  indices = batch['indices']
  images = jax.lax.with_sharding_constraint(data['train_images'][indices], sharding)
  flips = None
  if flip and alternate_flip_epoch:
    flips = transforms.alternate_flips(indices, jnp.asarray(step) // alternate_flip_epoch)
  x = transforms.augment(transforms.normalize(images, data['mean'], data['std']), rng,
                         crop_padding=crop_padding, flip=flip, pad_mode=pad_mode, flips=flips)
  return x.astype(dtype), data['train_labels'][indices]


def eval_batch(test, batch, *, batch_size, sharding, dtype):
  """The eval step's normalised images, labels and mask: slice `batch['index']` of the padded
  device-resident test set."""
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, batch['index'] * batch_size, batch_size)
  images = jax.lax.with_sharding_constraint(take(test['images']), sharding)
  x = transforms.normalize(images, test['mean'], test['std']).astype(dtype)
  return x, take(test['labels']), take(test['mask'])


def epoch_permutation(seed, epoch, n):
  """The order of the training examples in `epoch`: a function of (seed, epoch) only,
  so a resumed run continues with the same data order."""
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
