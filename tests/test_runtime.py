"""Start-up settings: the compilation cache and the light TensorBoard writer."""

import os
import subprocess
import sys

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
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'CVJAX_XLA_DEFAULTS', 'CVJAX_NATIVE')}
  code = ('import os; import cvjax, cvjax.tools.report, cvjax.train, jax\n'
          'def show(): print(repr(os.environ.get("XLA_FLAGS")), '
          'jax.config.jax_compilation_cache_dir is not None)\n'
          'show(); from cvjax import runtime; runtime.configure(); show()')
  for flags in ('--xla_cpu_enable_fast_math=false', None):
    child = dict(env, CVJAX_NATIVE='0')  # Then configure() adds CPU_FLAGS: it did something.
    child.pop('XLA_FLAGS', None)
    if flags:
      child['XLA_FLAGS'] = flags
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=child)
    assert out.returncode == 0, out.stderr
    imported, configured = out.stdout.splitlines()
    assert imported == f'{flags!r} False'
    assert configured == f"{repr(' '.join(filter(None, (flags, *runtime.CPU_FLAGS))))} True"


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  code = ('import sys; from cvjax.metric_writer import summary_writer; '
          f'w = summary_writer({str(tmp_path)!r}); w.add_scalar("x", 1.0, 1); w.close(); '
          'print("torch" in sys.modules)')
  assert _python(code) == ['False']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
