"""Process settings of cvjax's commands, applied before JAX starts its backend: XLA:CPU flags
and the compilation cache. Each entry point (`python -m cvjax.main`, `cvjax.evaluate`,
`cvjax.import_weights`, the benchmarks) calls `configure()` first; importing cvjax changes
nothing, so a program that uses cvjax as a library keeps its own XLA_FLAGS and cache.

XLA:CPU's "ynn" (YNNPACK) fusions help reductions and elementwise work but slow down
convolution-heavy steps when they also take dots and convolutions. Keeping only the
reduce and eltwise kinds made the ResNet-20 train step 1.28x faster than with ynn off
(358 vs 279 img/s, cvjax.benchmark, README). With the convolutions on oneDNN
(cvjax.ops.onednn) XLA runs none of them and its default ynn fusions are faster, so the
flags are set only where that backend will not run. On jaxlib 0.11 and later the reduce and
eltwise ynn fusions compute garbage in bfloat16 (`cpu_flags`): programs that compute in
bfloat16 are compiled without ynn fusions (`program_options`), float32 ones keep them.
Set CVJAX_XLA_DEFAULTS=0 to leave XLA_FLAGS untouched.

Compiled programs are kept in JAX's persistent compilation cache under the cvjax cache
folder, so a second run of the same model skips most of its compilation (README, "Speed").
A JAX_COMPILATION_CACHE_DIR set by the user wins.
"""

import logging
import os
import sys

YNN_FUSIONS = '--xla_cpu_experimental_ynn_fusion_type'


def configure():
  """Sets XLA:CPU's flags (unless CVJAX_XLA_DEFAULTS=0), turns on the compilation cache and
  drops JAX's note about a missing TPU. Call it before JAX starts its backend (the first
  array or device query); importing JAX before is fine. Calling it again changes nothing."""
  set_xla_flags()
  enable_compilation_cache()
  quiet_jax_logs()
  quiet_late_io_completions()


def cache_dir():
  """cvjax's cache folder: $CVJAX_CACHE_DIR, else ~/.cache/cvjax."""
  return os.environ.get('CVJAX_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                           'cvjax')


def set_xla_flags():
  if os.environ.get('CVJAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in cpu_flags(native_conv_expected()):
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags


def cpu_flags(native):
  """XLA:CPU's flags for this jaxlib, with convolutions on oneDNN (`native`) or on XLA.

  jaxlib 0.11 and 0.12 (0.10.2 is right): a ynn reduce or eltwise fusion that takes a
  bfloat16 convolution's converts returns NaN or values near 1e31 instead of its sum (ResNet's
  global average pool of its last block: every test loss of a bf16 run was NaN). Float32 and
  the other fusion types gave the right sums in the same check, which tests/test_runtime.py
  runs on every JAX. With oneDNN's convolutions the process keeps XLA's defaults, which are
  1.3x faster for float32 ResNet-20 on jax 0.12.1 than without reduce and eltwise (533 / 512
  against 411 / 381 img/s, a quiet 2-core Zen 4), and a bfloat16 program turns ynn off for
  itself (`program_options`)."""
  if jaxlib_version() >= (0, 11):
    return () if native else (f'{YNN_FUSIONS}=',)
  return () if native else (f'{YNN_FUSIONS}=reduce,eltwise',)


def program_options(dtype):
  """XLA options of one program that computes in `dtype` (jax.jit's `compiler_options`): on a
  CPU with jaxlib 0.11 or later, no ynn fusions for a bfloat16 program (`cpu_flags`: its
  reduce and eltwise fusions return NaN there); None, the process's flags, otherwise."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if (jnp.dtype(dtype) == jnp.bfloat16 and jaxlib_version() >= (0, 11)
      and jax.default_backend() == 'cpu'):
    return {YNN_FUSIONS.lstrip('-'): ''}
  return None


def jaxlib_version():
  """(major, minor) of the installed jaxlib, read without importing it; (0, 0) if absent."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return tuple(int(p) for p in importlib.metadata.version('jaxlib').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return (0, 0)


def native_conv_expected():
  """Whether convolutions will run on oneDNN (cvjax.ops.onednn), decided without importing
  JAX: then XLA's default ynn fusions are the faster ones (BatchNorm forward and backward
  8.9 ms vs 25 ms with reduce,eltwise only, README) and are kept (`cpu_flags`)."""
  return os.environ.get('CVJAX_NATIVE', '1') != '0' and native_conv_buildable()


def native_conv_buildable():
  """Linux x86-64, a C++ compiler, and the oneDNN wheels of requirements.txt."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  if (sys.platform != 'linux' or platform.machine() != 'x86_64'
      or not shutil.which(os.environ.get('CXX', 'g++'))):
    return False
  try:
    importlib.metadata.version('onednn-cpu-gomp')
    importlib.metadata.version('onednn-devel-cpu-gomp')
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def enable_compilation_cache():
  settings = {'jax_compilation_cache_dir': os.path.join(cache_dir(), 'jax'),
              # Programs that compile faster than this are not worth a file.
              'jax_persistent_cache_min_compile_time_secs': 0.5}
  if filelock_available():  # JAX evicts with a file lock; without one it refuses a size.
    settings['jax_compilation_cache_max_size'] = 2 << 30  # Least recently used go first.
  if 'jax' in sys.modules:  # JAX read its environment already: update its config.
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_compilation_cache_dir is None:
      for name, value in settings.items():
        jax.config.update(name, value)
  elif 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    for name, value in settings.items():
      os.environ[name.upper()] = str(value)


def filelock_available():
  """Whether `filelock` imports: JAX needs it to bound the cache's size, and without it
  refuses every cache read and write (a warning each) once a size is set. It is in
  requirements.txt; a user's own environment may lack it, and then the cache grows unbounded
  rather than not working."""
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


class _NoMissingTpu(logging.Filter):
  """Drops JAX's INFO note that libtpu is absent, which every command on a machine without a
  TPU printed first; a TPU that fails to start is still reported (at WARNING or above)."""

  def filter(self, record):
    return not (record.levelno < logging.WARNING
                and record.getMessage().startswith("Unable to initialize backend 'tpu'"))


def _is_late_io_completion(exc_type, exc, tb):
  """RuntimeError('Event loop is closed') raised by asyncio's call_soon_threadsafe."""
  if exc_type is not RuntimeError or str(exc) != 'Event loop is closed':
    return False
  import traceback  # pylint: disable=g-import-not-at-top
  names = [f.name for f in traceback.extract_tb(tb)]
  return names[-2:] == ['call_soon_threadsafe', '_check_closed']


def quiet_late_io_completions():
  """Drops one harmless report: when an orbax save or restore fails (a full disk, a damaged
  checkpoint), orbax raises the first error and closes its asyncio event loop while
  TensorStore still has reads or writes of that checkpoint in flight. As each finishes,
  a TensorStore thread tells the closed loop (`call_soon_threadsafe`), gets
  RuntimeError('Event loop is closed') and prints it with PyErr_Print, a traceback after
  cvjax's own message. Only that exception, on a thread other than the main one, is
  dropped; every other one reaches the previous hook."""
  previous = sys.excepthook
  if getattr(previous, 'cvjax_quiet', False):
    return

  def hook(exc_type, exc, tb):
    import threading  # pylint: disable=g-import-not-at-top
    if (threading.current_thread() is not threading.main_thread()
        and _is_late_io_completion(exc_type, exc, tb)):
      return
    previous(exc_type, exc, tb)
  hook.cvjax_quiet = True
  sys.excepthook = hook


def quiet_jax_logs():
  logger = logging.getLogger('jax._src.xla_bridge')
  if not any(isinstance(f, _NoMissingTpu) for f in logger.filters):
    logger.addFilter(_NoMissingTpu())
