import gzip
import io
import os
import struct
import tarfile

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import bars, tiny_config, write_idx
from cvjax import experiment, population, train
from cvjax.data import memory as ip
from cvjax.data import transforms
from cvjax.errors import UserError


def test_idx_folder_gz_and_raw(tmp_path):
  train, test = bars(20, seed=0), bars(7, seed=1)
  for compress, sub in ((True, 'gz'), (False, 'raw')):
    write_idx(tmp_path / sub, *train, 'train', compress)
    write_idx(tmp_path / sub, *test, 't10k', compress)
    data = ip.load_local(str(tmp_path / sub), 'fashion_mnist')
    assert data.train_images.shape == (20, 12, 12, 1) and data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images[..., 0], train[0])
    np.testing.assert_array_equal(data.test_labels, test[1])
    assert data.class_names[0] == 'T-shirt/top' and data.num_classes == 10


def test_idx_errors_name_the_file(tmp_path):
  write_idx(tmp_path, *bars(5), 'train')
  with pytest.raises(UserError, match='t10k-images-idx3-ubyte.gz'):
    ip.load_local(str(tmp_path))
  write_idx(tmp_path, *bars(5), 't10k')
  bad = tmp_path / 't10k-images-idx3-ubyte.gz'
  with gzip.open(bad, 'wb') as f:  # Wrong magic number.
    f.write(struct.pack('>4I', 2049, 5, 12, 12) + bytes(5 * 144))
  with pytest.raises(UserError, match=r't10k-images-idx3-ubyte.gz has IDX magic number 2049, expected 2051'):
    ip.load_local(str(tmp_path))
  with gzip.open(bad, 'wb') as f:  # Truncated.
    f.write(struct.pack('>4I', 2051, 5, 12, 12) + bytes(100))
  with pytest.raises(UserError, match='truncated'):
    ip.load_local(str(tmp_path))
  bad.write_bytes(b'not gzip at all')
  with pytest.raises(UserError, match='cannot read IDX file .*t10k-images'):
    ip.load_local(str(tmp_path))


def _png(value, size=(6, 5)):
  buf = io.BytesIO()
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def _write_image_folder(root):
  for split, n in (('train', 3), ('test', 2)):
    for c, cls in enumerate(('zebra', 'ant', 'cat')):
      os.makedirs(root / 'top' / split / cls, exist_ok=True)
      for i in range(n):
        (root / 'top' / split / cls / f'{i}.png').write_bytes(_png(10 * c + i))


def test_image_folder_directory_and_tar(tmp_path):
  _write_image_folder(tmp_path / 'folder')
  archive = tmp_path / 'folder.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'folder' / 'top', arcname='top')
  for path in (tmp_path / 'folder', archive):
    data = ip.load_local(str(path))
    assert data.class_names == ['ant', 'cat', 'zebra']  # Sorted class names.
    assert data.train_images.shape == (9, 6, 5, 3) and data.test_images.shape == (6, 6, 5, 3)
    # 'ant' (label 0) images were written with values 10..12.
    assert sorted(data.train_images[data.train_labels == 0][:, 0, 0, 0]) == [10, 11, 12]
    assert np.bincount(data.test_labels).tolist() == [2, 2, 2]


def test_decoded_image_folders_are_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('CVJAX_CACHE_DIR', str(tmp_path / 'cache'))
  _write_image_folder(tmp_path / 'folder')
  archive = tmp_path / 'folder.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'folder' / 'top', arcname='top')
  decoded = []
  decode = ip._decode
  monkeypatch.setattr(ip, '_decode', lambda *a: decoded.append(a[1]) or decode(*a))
  for path in (tmp_path / 'folder', archive):
    first = ip.load_local(str(path))
    n = len(decoded)
    assert n > 0
    again = ip.load_local(str(path))  # From the cache: nothing decoded.
    assert len(decoded) == n
    for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
      np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    assert again.class_names == first.class_names
  assert len(os.listdir(tmp_path / 'cache' / 'datasets')) == 2
  # Changed data is decoded again; an unreadable cache entry is decoded again too.
  (tmp_path / 'folder' / 'top' / 'test' / 'ant' / '0.png').write_bytes(_png(99))
  assert ip.load_local(str(tmp_path / 'folder')).test_images[0, 0, 0, 0] == 99
  for entry in os.listdir(tmp_path / 'cache' / 'datasets'):
    (tmp_path / 'cache' / 'datasets' / entry).write_bytes(b'torn')
  n = len(decoded)
  assert ip.load_local(str(archive)).class_names == ['ant', 'cat', 'zebra']
  assert len(decoded) > n


def test_image_folder_errors(tmp_path):
  _write_image_folder(tmp_path)
  (tmp_path / 'top' / 'train' / 'ant' / '9.png').write_bytes(_png(1, size=(7, 7)))
  with pytest.raises(UserError, match='9.png is .*same size'):
    ip.load_local(str(tmp_path))
  (tmp_path / 'top' / 'train' / 'ant' / '9.png').write_bytes(b'garbage')
  with pytest.raises(UserError, match='cannot decode image .*9.png'):
    ip.load_local(str(tmp_path))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(UserError, match='train/<class>'):
    ip.load_local(str(empty))
  with pytest.raises(UserError, match='does not exist'):
    ip.load_local(str(tmp_path / 'nope'))


@pytest.mark.slow
def test_tfds_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):  # Stands in for prepared data on disk.
    data = ip.load(ConfigDict(dict(name='cifar10', path='', data_dir='', download=False)))
  assert data.train_images.shape == (12, 32, 32, 3) and data.train_images.dtype == np.uint8
  assert data.test_images.shape == (12, 32, 32, 3) and data.num_classes == 10
  assert len(data.class_names) == 10  # Mock metadata carries no names.


@pytest.mark.slow
def test_tfds_unknown_name_and_offline(tmp_path, monkeypatch):
  with pytest.raises(UserError, match='unknown dataset.name=.places365.*cifar10'):
    ip.load(ConfigDict(dict(name='places365', path='', data_dir='', download=True)))
  with pytest.raises(UserError, match='imagenet2012.*too large to hold in memory'):
    ip.load(ConfigDict(dict(name='imagenet2012', path='', data_dir='', download=True)))
  with pytest.raises(UserError, match='not available in data_dir.*dataset.path'):
    ip.load(ConfigDict(dict(name='mnist', path='', data_dir=str(tmp_path), download=False)))

  def offline(*a, **k):
    raise OSError('Name or service not known')
  monkeypatch.setattr('socket.getaddrinfo', offline)
  with pytest.raises(UserError, match='no network'):
    ip.load(ConfigDict(dict(name='mnist', path='', data_dir=str(tmp_path), download=True)))


@pytest.mark.slow
def test_augmentation_is_deterministic_given_the_rng():
  images = jax.random.normal(jax.random.key(0), (8, 12, 12, 3))
  a = transforms.augment(images, jax.random.key(1), crop_padding=4, flip=True)
  b = transforms.augment(images, jax.random.key(1), crop_padding=4, flip=True)
  c = transforms.augment(images, jax.random.key(2), crop_padding=4, flip=True)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == images.shape
  # Every output is a shifted (and maybe flipped) window of its zero-padded input.
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, src in zip(np.asarray(a), padded):
    windows = [src[y:y + 12, x:x + 12] for y in range(9) for x in range(9)]
    assert any(np.array_equal(img, w) or np.array_equal(img, w[:, ::-1]) for w in windows)
  # Without augmentation the images pass through unchanged.
  np.testing.assert_array_equal(transforms.augment(images, jax.random.key(1), crop_padding=0,
                                           flip=False), images)


def test_epoch_permutation_and_padding():
  p0 = ip.epoch_permutation(0, 0, 100)
  np.testing.assert_array_equal(p0, ip.epoch_permutation(0, 0, 100))
  assert sorted(p0) == list(range(100))
  assert not np.array_equal(p0, ip.epoch_permutation(0, 1, 100))
  assert not np.array_equal(p0, ip.epoch_permutation(1, 0, 100))
  x = np.ones((2, 28, 28, 1), np.uint8)
  padded = ip.pad_to(x, 32)
  assert padded.shape == (2, 32, 32, 1) and padded.sum() == x.sum()
  assert padded[0, 2, 2, 0] == 1 and padded[0, 1, 2, 0] == 0


def test_normalization_stats():
  x = np.stack([np.zeros((2, 2, 3)), np.full((2, 2, 3), 255)]).astype(np.uint8)
  mean, std = ip.normalization_stats(x, 'per_pixel_mean')
  assert mean.shape == (1, 2, 2, 3) and np.allclose(mean, 0.5) and np.allclose(std, 1)
  mean, std = ip.normalization_stats(x, 'per_channel')
  assert mean.shape == (1, 1, 1, 3) and np.allclose(std, 0.5)
  with pytest.raises(UserError, match='per_pixel_mean'):
    ip.normalization_stats(x, 'zca')


def indices_batch(exp, step, k):
  """Steps [step, step + k)'s batch written out: each member's example indices in its own
  seed's order, [k, members, batch] (the axes one step or one run lacks left out), placed as
  the train step wants them."""
  def one(t):
    return population.per_member(exp, lambda config: exp.input.train_indices(config.seed, t))
  batch = one(step) if k == 1 else population.stack([one(t) for t in range(step, step + k)])
  sharding = NamedSharding(exp.mesh, P(*(None,) * (k > 1), *population.batch_axes(exp)))
  return jax.tree.map(lambda x: {'indices': jax.device_put(x, sharding)}, batch)


@pytest.mark.parametrize('seeds', [1, 3])
def test_the_loops_batches_are_each_steps_indices_in_each_members_order(idx_dir, seeds):
  """The one way batches reach the train step (`Input.train_batches`, k at a time placed by
  `train.place_batch`) gives, for one run and a population, what `indices_batch` (the rule
  written out here) gives for the same steps, placed alike, across an epoch end; a stream
  begun at a later step (a resume) continues the one begun at 0."""
  c = tiny_config(idx_dir)
  c.population.seeds = seeds
  exp = experiment.build(c)
  batches = exp.input.train_batches(0, train.data_seeds(exp))
  step = 0
  for k in (1, 3, 5, 2):  # 96 examples in batches of 16: 6 steps per epoch.
    taken = [next(batches) for _ in range(k)]
    got, want = train.place_batch(exp, taken), indices_batch(exp, step, k)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.shape == b.shape and a.dtype == b.dtype and a.sharding == b.sharding
      np.testing.assert_array_equal(a, b)
    step += k
  resumed = next(exp.input.train_batches(step, train.data_seeds(exp)))
  jax.tree.map(np.testing.assert_array_equal, resumed, next(batches))
