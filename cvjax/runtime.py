"""Runtime settings applied before JAX starts its backend: XLA:CPU flags and caches.

XLA:CPU's "ynn" (YNNPACK) fusions help reductions and elementwise work but slow down
convolution-heavy steps when they also take dots and convolutions. Keeping only the
reduce and eltwise kinds made the ResNet-20 train step 1.28x faster than with ynn off
(358 vs 279 img/s, cvjax.benchmark, README). Set CVJAX_XLA_DEFAULTS=0
to leave XLA_FLAGS untouched.

Compiled programs are kept in JAX's persistent compilation cache under the cvjax cache
folder, so a second run of the same model skips most of its compilation (README, "Speed").
A JAX_COMPILATION_CACHE_DIR set by the user wins.
"""

import os
import sys

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce,eltwise',)


def cache_dir():
  """cvjax's cache folder: $CVJAX_CACHE_DIR, else ~/.cache/cvjax."""
  return os.environ.get('CVJAX_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                           'cvjax')


def set_xla_flags():
  enable_compilation_cache()
  if os.environ.get('CVJAX_XLA_DEFAULTS', '1') == '0':
    return
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags


def enable_compilation_cache():
  settings = {'jax_compilation_cache_dir': os.path.join(cache_dir(), 'jax'),
              # Programs that compile faster than this are not worth a file.
              'jax_persistent_cache_min_compile_time_secs': 0.5,
              'jax_compilation_cache_max_size': 2 << 30}  # Least recently used go first.
  if 'jax' in sys.modules:  # JAX read its environment already: update its config.
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_compilation_cache_dir is None:
      for name, value in settings.items():
        jax.config.update(name, value)
  elif 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    for name, value in settings.items():
      os.environ[name.upper()] = str(value)
