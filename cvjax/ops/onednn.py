"""oneDNN convolutions for XLA:CPU, as `jax.ffi` custom calls (native/onednn_conv.cc).

XLA:CPU's convolution kernels hold most of the gap to PyTorch on CPU; oneDNN's are the ones
PyTorch uses; float32, and bfloat16 where the CPU has bfloat16 instructions (`bf16()`).
The C++ source is compiled on first use against oneDNN from PyPI
(`onednn-cpu-gomp`, `onednn-devel-cpu-gomp`) and the FFI headers that ship with jaxlib, and
cached in the cvjax cache folder (~/.cache/cvjax, or $CVJAX_CACHE_DIR) under a hash of the source and the versions,
so a second process only loads it. Where it cannot be built or loaded (no compiler, no
oneDNN, another OS), or when CVJAX_NATIVE=0, `available()` is False, the log says so once,
and cvjax.ops.convolution keeps XLA's own convolutions.

CVJAX_NATIVE_SANITIZE=address (or thread) builds a separate copy of the library with that
sanitizer, for hunting memory and threading bugs in it (docs/performance.md has the
command: the Python process must preload the sanitizer's runtime).
"""

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cvjax import runtime

SOURCE = pathlib.Path(__file__).parent / 'native' / 'onednn_conv.cc'
_RUNTIME, _DEVEL = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'


def _dist_dir(dist, name):
  """The directory of file `name` (e.g. 'libdnnl.so.3') installed by package `dist`."""
  for f in importlib.metadata.distribution(dist).files or ():
    if f.name == name:
      return pathlib.Path(f.locate()).resolve().parent
  raise FileNotFoundError(f'{name} is not in the {dist} package')


def build():
  """Compiles the library if its cached copy is missing; returns its path.

  The file is written under a temporary name and renamed into place, so a process never
  loads a partly written library."""
  lib_dir = _dist_dir(_RUNTIME, 'libdnnl.so.3')
  include = _dist_dir(_DEVEL, 'dnnl.hpp')
  source = SOURCE.read_bytes()
  sanitize = os.environ.get('CVJAX_NATIVE_SANITIZE', '')
  if sanitize not in ('', 'address', 'thread'):
    raise ValueError(f'CVJAX_NATIVE_SANITIZE={sanitize!r}; expected address or thread')
  key = hashlib.sha256(b'\0'.join([
      source, importlib.metadata.version('jaxlib').encode(),
      importlib.metadata.version(_RUNTIME).encode(), str(lib_dir).encode(),
      sanitize.encode()])).hexdigest()[:16]
  out = pathlib.Path(runtime.cache_dir()) / f'onednn_conv-{key}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Processes starting together (a sweep's trials, test workers) wait for one build.
  with open(out.with_name(out.name + '.lock'), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # No locks on this file system: each builds its own copy, as before.
      pass
    if not out.exists():
      _compile(out, lib_dir, include, sanitize)
  return out


def _compile(out, lib_dir, include, sanitize):
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  extra = [f'-fsanitize={sanitize}', '-g', '-fno-omit-frame-pointer'] if sanitize else []
  cmd = [os.environ.get('CXX', 'g++'), '-O2', '-std=c++17', '-shared', '-fPIC', '-w', *extra,
         f'-I{jax.ffi.include_dir()}', f'-I{include}', str(SOURCE), f'-L{lib_dir}',
         '-l:libdnnl.so.3', f'-Wl,-rpath,{lib_dir}', '-o', tmp]
  t0 = time.perf_counter()
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info('Built the oneDNN convolution library in %.1f s: %s', time.perf_counter() - t0,
               out)


def unbuildable_reason():
  """Why the library cannot be built on this machine, or None if it can."""
  if sys.platform != 'linux' or platform.machine() != 'x86_64':
    return f'the oneDNN wheels are for Linux x86-64, not {sys.platform} {platform.machine()}'
  if not runtime.native_conv_buildable():
    return (f'no C++ compiler ({os.environ.get("CXX", "g++")}) on the PATH, or no '
            f'{_RUNTIME}/{_DEVEL} (pip install -r requirements.txt)')
  return None


@functools.cache
def _load():
  """Builds, loads and registers the custom calls once; (ok, reason)."""
  if os.environ.get('CVJAX_NATIVE', '1') == '0':
    return False, 'CVJAX_NATIVE=0'
  if reason := unbuildable_reason():
    return False, reason
  try:
    path = build()
    # oneDNN's OpenMP threads sleep between calls instead of spinning: XLA's own threads
    # share the cores with them (and 8 simulated devices stalled with spinning teams).
    # libgomp reads this when it loads; the setting is put back so that other OpenMP
    # runtimes loaded later (PyTorch's) keep their own default.
    saved = os.environ.get('OMP_WAIT_POLICY')
    os.environ['OMP_WAIT_POLICY'] = saved or 'PASSIVE'
    try:
      lib = ctypes.CDLL(str(path))
    finally:
      if saved is None:
        del os.environ['OMP_WAIT_POLICY']
    for name in ('CvjaxConvForward', 'CvjaxConvBackward'):
      jax.ffi.register_ffi_target(f'cvjax_{name}', jax.ffi.pycapsule(getattr(lib, name)),
                                  platform='cpu')
    lib.CvjaxOnednnVersion.restype = ctypes.c_char_p
    version = lib.CvjaxOnednnVersion().decode()
    lib.CvjaxOnednnBf16Kernel.restype = ctypes.c_char_p
    _BF16.update(ok=bool(lib.CvjaxOnednnBf16()), kernel=lib.CvjaxOnednnBf16Kernel().decode())
  except subprocess.CalledProcessError as e:
    return False, f'compiling {SOURCE.name} failed: {e.stderr.strip()[-2000:]}'
  except (OSError, FileNotFoundError, AttributeError, ValueError) as e:
    return False, f'{type(e).__name__}: {e}'
  logging.info('Convolutions on CPU run on oneDNN %s through XLA FFI calls.', version)
  return True, version


_BF16 = {'ok': False, 'kernel': None}  # Filled in by _load.


def bf16():
  """Whether oneDNN runs bfloat16 convolutions on the CPU's bfloat16 instructions here
  (avx512_bf16 or AMX, as oneDNN sees them: ONEDNN_MAX_CPU_ISA caps them)."""
  return available() and _BF16['ok']


def bf16_kernel():
  """oneDNN's kernel for a bfloat16 CIFAR ResNet convolution, e.g. 'brg:avx512_core_bf16'."""
  return _BF16['kernel'] if available() else None


def version():
  """The oneDNN version the library runs with, e.g. '3.2.0 OpenMP'; None if unavailable."""
  ok, version_or_reason = _load()
  return version_or_reason if ok else None


def available():
  """True when the oneDNN custom calls are registered (logs why not, once)."""
  ok, reason = _load()
  if not ok:
    _log_unavailable(reason)
  return ok


@functools.cache
def _log_unavailable(reason):
  logging.warning('cvjax: oneDNN convolutions unavailable (%s); using XLA\'s convolutions.',
                  reason)


def supports(x, w, strides, padding, groups):
  """Whether the kernel takes this convolution: NHWC/HWIO, padding >= 0, float32, or
  bfloat16 where the CPU has bfloat16 instructions (`bf16()`)."""
  dtype_ok = x.dtype == w.dtype and (x.dtype == jnp.float32
                                     or (x.dtype == jnp.bfloat16 and bf16()))
  return (dtype_ok and x.ndim == 4 and w.ndim == 4
          and groups >= 1 and x.shape[3] == w.shape[2] * groups and w.shape[3] % groups == 0
          and all(p >= 0 for pair in padding for p in pair)
          and all(s >= 1 for s in strides) and 0 not in x.shape and 0 not in w.shape
          and all(n + lo + hi >= k for n, k, (lo, hi) in zip(x.shape[1:3], w.shape[:2], padding)))


def _attrs(strides, padding, groups):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
              pad_right=np.int64(pr), groups=np.int64(groups))


def out_shape(x, w, strides, padding):
  n, h, wd, _ = x.shape
  oh, ow = ((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi)
            in zip((h, wd), w.shape[:2], strides, padding))
  return (n, oh, ow, w.shape[3])


def forward(x, w, strides, padding, groups=1):
  y = jax.ShapeDtypeStruct(out_shape(x, w, strides, padding), x.dtype)
  return jax.ffi.ffi_call('cvjax_CvjaxConvForward', y, vmap_method='sequential')(
      x, w, **_attrs(strides, padding, groups))


def backward(x, w, dy, strides, padding, groups=1, need_dx=True):
  """(dx, dw) in one call; with need_dx=False, dx is left unwritten (garbage)."""
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
  return jax.ffi.ffi_call('cvjax_CvjaxConvBackward', shapes, vmap_method='sequential')(
      x, w, dy, **_attrs(strides, padding, groups), need_dx=np.int64(need_dx))
