"""Start-up settings: the compilation cache and the light TensorBoard writer."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


@pytest.mark.slow
def test_compilation_cache_in_the_cvjax_cache_folder(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  code = 'import cvjax, jax; print(jax.config.jax_compilation_cache_dir)'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**env, 'CVJAX_CACHE_DIR': str(tmp_path)})
  assert out.stdout.split() == [str(tmp_path / 'jax')], out.stderr
  # Imported after jax, cvjax still sets it; a user's own setting wins.
  assert _python('import jax, cvjax; print(jax.config.jax_compilation_cache_dir)',
                 CVJAX_CACHE_DIR=str(tmp_path)) == [str(tmp_path / 'jax')]
  assert _python('import cvjax, jax; print(jax.config.jax_compilation_cache_dir)',
                 JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'mine')) == [str(tmp_path / 'mine')]


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  code = ('import sys; from cvjax.metric_writer import summary_writer; '
          f'w = summary_writer({str(tmp_path)!r}); w.add_scalar("x", 1.0, 1); w.close(); '
          'print("torch" in sys.modules)')
  assert _python(code) == ['False']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
