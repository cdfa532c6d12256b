"""Start-up settings: the compilation cache and the light TensorBoard writer."""

import os
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_test_cache():
  """This environment without the test session's compilation cache settings (conftest.py),
  as a user's would be."""
  return {k: v for k, v in os.environ.items()
          if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}


def _python(code, **env):
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**without_test_cache(), **env})
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


CONFIGURE = 'from cvjax import runtime; runtime.configure(); '


@pytest.mark.slow
def test_compilation_cache_in_the_cvjax_cache_folder(tmp_path):
  env = without_test_cache()
  code = CONFIGURE + 'import jax; print(jax.config.jax_compilation_cache_dir)'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**env, 'CVJAX_CACHE_DIR': str(tmp_path)})
  assert out.stdout.split() == [str(tmp_path / 'jax')], out.stderr
  # Configured after jax is imported, the cache is still set; a user's own setting wins.
  assert _python('import jax; ' + CONFIGURE + 'print(jax.config.jax_compilation_cache_dir)',
                 CVJAX_CACHE_DIR=str(tmp_path)) == [str(tmp_path / 'jax')]
  assert _python(CONFIGURE + 'import jax; print(jax.config.jax_compilation_cache_dir)',
                 JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine')) == [str(tmp_path / 'mine')]


def test_importing_cvjax_sets_nothing_process_wide():
  """Only the commands set XLA flags and the cache: a library user's XLA_FLAGS stay theirs."""
  env = {k: v for k, v in without_test_cache().items()
         if k not in ('XLA_FLAGS', 'CVJAX_XLA_DEFAULTS')}
  code = ('import os; import cvjax, cvjax.tools.report\n'
          'def show(): print(repr(os.environ.get("XLA_FLAGS")), '
          '"JAX_COMPILATION_CACHE_DIR" in os.environ)\n'
          'show(); from cvjax import runtime; runtime.configure(); show()\n'
          # A user's own flags stay, ahead of cvjax's.
          'os.environ["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false"; runtime.configure(); show()')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(env, CVJAX_NATIVE='0'))  # Then flags are set.
  assert out.returncode == 0, out.stderr
  cpu_flags = ' '.join(runtime.cpu_flags(native=False))
  assert out.stdout.splitlines() == [
      'None False', f'{cpu_flags!r} True', f"'--xla_cpu_enable_fast_math=false {cpu_flags}' True"]


FILELOCK_CHECK = '''
import os, sys, warnings
if {hide}:
  sys.modules['filelock'] = None  # As in an environment without the package.
from cvjax import runtime; runtime.configure()
import jax, jax.numpy as jnp
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()
print(len(caught), jax.config.jax_compilation_cache_max_size)
for w in caught:
  print(w.message, file=sys.stderr)
'''


@pytest.mark.parametrize('hide', [True, False])
def test_compilation_cache_works_with_and_without_filelock(tmp_path, hide):
  """JAX refuses a cache size without `filelock`, with a warning at every cache read and write
  and nothing cached: cvjax sets the size only when filelock imports."""
  env = without_test_cache()
  out = subprocess.run([sys.executable, '-c', FILELOCK_CHECK.format(hide=hide)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**env, 'CVJAX_CACHE_DIR': str(tmp_path)})
  assert out.returncode == 0, out.stderr
  warnings, max_size = out.stdout.split()
  assert warnings == '0', out.stderr
  assert int(max_size) == (-1 if hide else 2 << 30)
  assert [f for f in os.listdir(tmp_path / 'jax') if f.endswith('-cache')], os.listdir(
      tmp_path / 'jax')


def test_a_late_io_completion_on_a_closed_event_loop_prints_nothing():
  """What TensorStore does when a read or write of a failed orbax save or restore finishes
  after orbax closed its event loop: call_soon_threadsafe on its thread, then PyErr_Print
  (sys.excepthook). That one report is dropped; any other still prints."""
  code = CONFIGURE + '''
import asyncio, sys, threading
loop = asyncio.new_event_loop()
loop.close()
def report(action):
  try:
    action()
  except RuntimeError:
    sys.excepthook(*sys.exc_info())  # As PyErr_Print does.
def other():
  raise RuntimeError('something else')
for action in (lambda: loop.call_soon_threadsafe(print), other):
  t = threading.Thread(target=report, args=(action,))
  t.start()
  t.join()
report(lambda: loop.call_soon_threadsafe(print))  # On the main thread: printed.
'''
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stderr.count('Traceback') == 2, out.stderr
  assert 'RuntimeError: something else' in out.stderr
  assert out.stderr.count('RuntimeError: Event loop is closed') == 1, out.stderr


def test_bfloat16_block_sums_right_under_the_flags_cvjax_sets():
  """The end of an option-A ResNet block in bfloat16 (stride-2 convolution, BatchNorm, ReLU,
  convolution, BatchNorm, padded shortcut, ReLU, global average pool), jitted under the XLA
  flags conftest set with runtime.configure() and the options cvjax compiles a bfloat16
  program with, equals it op by op. With jaxlib 0.11 and 0.12's default ynn fusions the
  jitted sums were NaN or ~1e31 (a bf16 run's test loss was NaN)."""
  rng = np.random.default_rng(0)
  bf16, dims = jnp.bfloat16, ('NHWC', 'HWIO', 'NHWC')
  x = jnp.asarray(np.maximum(rng.standard_normal((16, 6, 6, 32)), 0), bf16)
  w1, w2 = (jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
            for s in ((3, 3, 32, 64), (3, 3, 64, 64)))
  mean, scale, bias = (jnp.asarray(rng.standard_normal((2, 1, 1, 1, 64)) * s, jnp.float32)
                       for s in (0.1, 1, 0.1))

  def block(x, w1, w2, mean, scale, bias):
    def conv_bn(h, w, stride, i):
      h = lax.conv_general_dilated(h, w.astype(bf16), (stride, stride), ((1, 1), (1, 1)),
                                   dimension_numbers=dims)
      return ((h.astype(jnp.float32) - mean[i]) * scale[i] + bias[i]).astype(bf16)
    h = conv_bn(jax.nn.relu(conv_bn(x, w1, 2, 0)), w2, 1, 1)
    h = jax.nn.relu(h + jnp.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (16, 16))))
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))

  args = (x, w1, w2, mean, scale, bias)
  # bfloat16 keeps 8 bits: fused, the roundings fall elsewhere (up to 0.02 apart on O(1)).
  jitted = jax.jit(block, compiler_options=runtime.program_options(bf16))
  np.testing.assert_allclose(jitted(*args), block(*args), rtol=0.05, atol=0.05)
