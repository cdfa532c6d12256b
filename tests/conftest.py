"""Tiny datasets written to disk, and tiny configs, shared by the tests."""

import gzip
import os
import struct
import subprocess
import sys
import tempfile
import types

# Decoded datasets, the native library and compiled programs: a cache of this test session
# only, inherited by the subprocesses tests start and by pytest-xdist's workers (which import
# this file after the controller did), so the library is built and a program compiled once.
# Every program is kept, however quick to compile: the same small ones (initialisers, eval
# steps, eager operations) compile in each worker and in each command a test starts. Set
# before JAX is imported, which reads them then; the commands leave a user's setting alone.
if 'PYTEST_XDIST_WORKER' not in os.environ:
  os.environ['CVJAX_CACHE_DIR'] = tempfile.mkdtemp(prefix='cvjax-test-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(os.environ['CVJAX_CACHE_DIR'], 'jax')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  # The native library, built while the workers start and collect; they wait for it.
  subprocess.Popen([sys.executable, '-c', 'from cvjax.ops import onednn; onednn.available()'],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

# The tests read event files with TensorBoard's own reader, which imports TensorFlow when it is
# installed (3-8 s per worker) unless this module exists; its stub reads local files alike.
sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from cvjax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
# What the commands set (XLA flags), for the tests that train in this process and for the
# children that import these helpers.
runtime.configure()

jax.config.update('jax_numpy_rank_promotion', 'raise')  # Catch silent broadcasting.


@pytest.hookimpl(trylast=True)  # After -m and -k deselected.
def pytest_collection_modifyitems(items):
  """torchvision imported after TensorFlow (the tfds tests) segfaults the process
  (tensorflow-cpu 2.21, torch 2.14.1, triton 3.8): a session that runs test_import_weights
  imports it now, before any test runs; the fast tier spares each worker the ~2 s."""
  if any(item.path.name == 'test_import_weights.py' for item in items):
    try:
      import torchvision  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
    except ImportError:
      pass  # Its tests skip.


def child_env(**variables):
  """The environment of a Python child run from ROOT (`python -c`, so cvjax and configs are
  found there) that imports these test helpers: the tests folder leads PYTHONPATH."""
  path = os.pathsep.join(p for p in (TESTS, os.environ.get('PYTHONPATH')) if p)
  return dict(os.environ, PYTHONPATH=path, **variables)


def bars(n, size=12, num_classes=10, seed=0):
  """Learnable images: class k has a bright bar at row k+1, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.uint8)
  images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
  images[np.arange(n), labels + 1, :] = 230
  return images, labels


def write_idx(folder, images, labels, prefix, compress=True):
  """Writes MNIST-style IDX files (big-endian uint32 header, then uint8 data)."""
  os.makedirs(folder, exist_ok=True)
  opener = gzip.open if compress else open
  ext = '.gz' if compress else ''
  with opener(os.path.join(folder, f'{prefix}-images-idx3-ubyte{ext}'), 'wb') as f:
    f.write(struct.pack('>4I', 2051, *images.shape) + images.tobytes())
  with opener(os.path.join(folder, f'{prefix}-labels-idx1-ubyte{ext}'), 'wb') as f:
    f.write(struct.pack('>2I', 2049, len(labels)) + labels.tobytes())


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  """96 train / 40 test images of 12x12, 10 classes."""
  folder = str(tmp_path_factory.mktemp('idx'))
  write_idx(folder, *bars(96, seed=0), 'train')
  write_idx(folder, *bars(40, seed=1), 't10k')
  return folder


def tiny_config(data_path, **overrides):
  """ResNet-8 on tiny data: a few seconds to compile and run."""
  from configs import resnet  # pylint: disable=g-import-not-at-top
  c = resnet.get_config('resnet8')
  c.dataset.path = data_path
  c.dataset.name = ''  # Unnamed data at dataset.path.
  c.input.crop_padding = 2
  c.train.batch_size = 16
  c.train.eval_batch_size = 16
  c.train.num_steps = 12
  c.train.log_every_steps = 4
  c.train.eval_every_steps = 6
  c.train.checkpoint_every_steps = 4
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c
