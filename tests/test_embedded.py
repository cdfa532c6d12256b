"""The datasets that ship inside cvjax: present, as documented, readable by name, rebuildable."""

import hashlib
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
from ml_collections import ConfigDict
import pytest

from cvjax.data import memory as ip

EMBEDDED = os.path.dirname(ip.embedded_path('mnist10k'))


def _build_module():
  spec = importlib.util.spec_from_file_location('build', os.path.join(EMBEDDED, 'build.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_files_match_the_checksums_their_readme_lists():
  readme = open(os.path.join(EMBEDDED, 'README.md')).read()
  listed = re.findall(r'\| `([\w/.-]+\.gz)` \| `([0-9a-f]{64})` \|', readme)
  assert len(listed) == 5
  for name, digest in listed:
    with open(os.path.join(EMBEDDED, name), 'rb') as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_mnist10k_by_name_offline():
  data = ip.load(ConfigDict(dict(name='mnist10k', path='', data_dir='', download=False)))
  assert data.train_images.shape == (8000, 28, 28, 1) and data.test_images.shape == (2000, 28, 28, 1)
  assert np.bincount(data.test_labels).tolist() == [200, 225, 198, 206, 196, 173, 203, 214, 189,
                                                    196]


def test_cifar10_6k_by_name_offline():
  data = ip.load(ConfigDict(dict(name='cifar10_6k', path='', data_dir='', download=False)))
  assert data.train_images.shape == (5000, 32, 32, 3) and data.test_images.shape == (1000, 32, 32, 3)
  assert data.class_names[0] == 'airplane' and data.class_names[9] == 'truck'
  assert np.bincount(data.train_labels).tolist() == [500] * 10
  assert np.bincount(data.test_labels).tolist() == [100] * 10


def test_a_changed_shipped_file_is_refused(tmp_path, monkeypatch):
  """A label file changed after shipping (still a valid IDX .gz) is refused by its README
  sum, also after the untouched copy was verified once in this process."""
  import gzip  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'embedded'
  os.makedirs(copy / 'mnist10k')
  for name in ['README.md'] + [f'mnist10k/{f}' for f in os.listdir(ip.embedded_path('mnist10k'))]:
    with open(os.path.join(EMBEDDED, name), 'rb') as src:
      (copy / name).write_bytes(src.read())
  monkeypatch.setattr(ip, 'EMBEDDED_DIR', str(copy), raising=False)
  cfg = ConfigDict(dict(name='mnist10k', path='', data_dir='', download=False))
  assert len(ip.load(cfg).train_labels) == 8000
  labels = copy / 'mnist10k' / 'train-labels-idx1-ubyte.gz'
  raw = bytearray(gzip.decompress(labels.read_bytes()))
  raw[8] = (raw[8] + 1) % 10  # One label changed.
  labels.write_bytes(gzip.compress(bytes(raw)))
  os.utime(labels, ns=(1, 1))
  with pytest.raises(ip.UserError, match=r'train-labels-idx1-ubyte.gz has sha256 [0-9a-f]{64}, '
                     r'but its README lists 16eb92c5'):
    ip.load(cfg)
  labels.unlink()
  with pytest.raises(ip.UserError, match=r"dataset 'mnist10k' lacks .*train-labels"):
    ip.load(cfg)


@pytest.mark.parametrize('argv,message', [
    (['mnist10k', '--npm={missing}', '{out}'], r'build.py: error: .*nowhere does not exist'),
    (['cifar10_6k', '--jpeg={missing}', '{out}.tar.gz'], r'nowhere does not exist'),
    (['cifar10_6k', '--jpeg={empty}', '{out}.tar.gz'],
     r'cannot build cifar10_6k from .*empty: ValueError: test/airplane has 0 images, need 100'),
    (['mnist10k', '--official={empty}', '{out}'], r'empty lacks train-images-idx3-ubyte.gz'),
    (['cifar10_6k', '--official={file}', '{out}.tar.gz'], r'from .*not_a_tar: ReadError'),
])
def test_build_from_a_missing_or_wrong_source_is_one_paragraph(tmp_path, argv, message):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'not_a_tar').write_text('x')
  argv = [a.format(missing=tmp_path / 'nowhere', empty=tmp_path / 'empty', out=tmp_path / 'out',
                   file=tmp_path / 'not_a_tar') for a in argv]
  out = subprocess.run([sys.executable, os.path.join(EMBEDDED, 'build.py'), *argv],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert re.search(message, out.stderr), out.stderr
  assert not [p for p in os.listdir(tmp_path) if p.startswith('out')]


@pytest.mark.slow
def test_build_writes_the_shipped_mnist10k_bytes(tmp_path):
  """Recovers each digit's images in package order from the shipped files (the documented
  split and sha256 order), rebuilds, and compares bytes: the builder is the one that made them."""
  build = _build_module()
  shipped = os.path.join(EMBEDDED, 'mnist10k')
  splits = {s: (build.read_idx(os.path.join(shipped, f'{p}-images-idx3-ubyte.gz')),
                build.read_idx(os.path.join(shipped, f'{p}-labels-idx1-ubyte.gz')))
            for s, p in (('train', 'train'), ('test', 't10k'))}
  counts = sum(np.bincount(y, minlength=10) for _, y in splits.values())
  digits = {d: np.zeros((counts[d], 28, 28), np.uint8) for d in range(10)}
  for split, (x, y) in splits.items():
    rows = []
    for d in range(10):
      n_test = int(round(0.2 * counts[d]))
      first, stop = (0, counts[d] - n_test) if split == 'train' else (counts[d] - n_test, counts[d])
      rows += [(d, i) for i in range(first, stop)]
    order = sorted(rows, key=lambda r: hashlib.sha256(
        f'mnist-10k:{split}:{r[0]}:{r[1]}'.encode()).digest())
    for pos, (d, i) in enumerate(order):
      assert y[pos] == d
      digits[d][i] = x[pos]
  build.write_mnist10k(digits, str(tmp_path))
  for name in os.listdir(shipped):
    with open(os.path.join(shipped, name), 'rb') as a, open(tmp_path / name, 'rb') as b:
      assert a.read() == b.read(), name


def test_build_rewrites_the_shipped_cifar10_6k_bytes(tmp_path):
  """The shipped archive is itself a JPEG tree of the repository's layout: cutting it again
  must give the same bytes (sorted members, fixed times and owners, gzip without a time)."""
  build = _build_module()
  shipped = ip.embedded_path('cifar10_6k')
  build.write_cifar_subset(build.jpegs_from_tree(shipped), str(tmp_path / 'out.tar.gz'))
  with open(shipped, 'rb') as a, open(tmp_path / 'out.tar.gz', 'rb') as b:
    assert a.read() == b.read()


def fake_cifar_release(path, per_batch=10, drop=()):
  """A tiny cifar-10-python.tar.gz: the release's members, pickled as the release pickles
  them, with random pixels; returns {split: (images NHWC, labels)}."""
  import io, pickle, tarfile  # pylint: disable=g-import-not-at-top,multiple-imports
  rng = np.random.default_rng(0)
  names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
           'truck']
  expected = {'train': ([], []), 'test': ([], [])}
  with tarfile.open(path, 'w:gz') as tar:
    def add(name, obj):
      if name in drop:
        return
      data = pickle.dumps(obj)
      info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    add('batches.meta', {b'label_names': [n.encode() for n in names]})
    for name, split in [(f'data_batch_{i}', 'train') for i in range(1, 6)] + [
        ('test_batch', 'test')]:
      images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
      labels = [int(x) for x in rng.permutation(10)[:per_batch]]  # Every class.
      add(name, {b'data': images.reshape(per_batch, -1), b'labels': labels})
      expected[split][0].append(images.transpose(0, 2, 3, 1))
      expected[split][1].extend(labels)
  return {s: (np.concatenate(i), np.array(l)) for s, (i, l) in expected.items()}


def test_convert_cifar10_release_to_the_image_folder_cvjax_reads(tmp_path, capsys):
  """The python-pickle release becomes an image-folder .tar.gz that dataset.path reads, with
  the release's pixels exactly (PNG) and its labels; a wrong archive is a clear error."""
  from cvjax.data import convert_cifar10  # pylint: disable=g-import-not-at-top
  expected = fake_cifar_release(tmp_path / 'cifar-10-python.tar.gz')
  out = str(tmp_path / 'cifar10.tar.gz')
  assert convert_cifar10.main(['x', str(tmp_path / 'cifar-10-python.tar.gz'), out]) == 0
  assert 'wrote' in capsys.readouterr().out
  data = ip.load(ConfigDict(dict(name='cifar10', path=out, data_dir='', download=False)))
  got = {'train': (data.train_images, data.train_labels),
         'test': (data.test_images, data.test_labels)}
  for split, (images, labels) in expected.items():
    class_of = [data.class_names.index(n) for n in (
        'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
        'truck')]
    key = lambda imgs, labs: sorted((int(l), imgs[i].tobytes()) for i, l in enumerate(labs))
    assert key(*got[split]) == key(images, [class_of[l] for l in labels]), split
  assert len(data.train_labels) == 50 and len(data.test_labels) == 10
  fake_cifar_release(tmp_path / 'binary.tar.gz', drop=('test_batch',))
  assert convert_cifar10.main(['x', str(tmp_path / 'binary.tar.gz'), out + '2.tar.gz']) == 2
  assert 'lacks test_batch' in capsys.readouterr().err
  assert not os.path.exists(out + '2.tar.gz')
