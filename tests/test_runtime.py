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


def _python(code, **env):
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


CONFIGURE = 'from cvjax import runtime; runtime.configure(); '


@pytest.mark.slow
def test_compilation_cache_in_the_cvjax_cache_folder(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
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
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR', 'CVJAX_XLA_DEFAULTS')}
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


def test_bfloat16_block_sums_right_under_the_flags_cvjax_sets():
  """The end of an option-A ResNet block in bfloat16 (stride-2 convolution, BatchNorm, ReLU,
  convolution, BatchNorm, padded shortcut, ReLU, global average pool), jitted under the XLA
  flags conftest set with runtime.configure(), equals it op by op. With jaxlib 0.11 and 0.12's
  default ynn fusions the jitted sums were NaN or ~1e31 (a bf16 run's test loss was NaN)."""
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
  np.testing.assert_allclose(jax.jit(block)(*args), block(*args), rtol=0.05, atol=0.05)
