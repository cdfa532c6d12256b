"""The one-command device check (experiments/gpu_check.sh): it stops in seconds when a package
is missing, and its benchmark keeps its results line on a backend without a FLOP count."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, child_env


def test_a_missing_package_stops_the_check_before_anything_runs(tmp_path):
  hidden = tmp_path / 'hidden'
  hidden.mkdir()
  (hidden / 'filelock.py').write_text('raise ImportError("not installed")\n')
  out_dir = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=str(hidden),
             PATH=f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}', OUT=str(out_dir),
             RUNS=str(tmp_path / 'runs'), RESULTS=str(tmp_path / 'gpu.json'),
             CIFAR=str(tmp_path / 'none.tar.gz'), QUICK='1', BENCH='0')
  out = subprocess.run(['bash', 'experiments/gpu_check.sh'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
  log = (out_dir / 'gpu_check.log').read_text()
  assert 'gpu_check: missing packages, nothing was run: filelock (import filelock' in log, log
  assert 'jax' not in log.split('missing packages')[0]  # Stopped before JAX started.
  assert not (out_dir / 'benchmark.jsonl').exists()


NO_COST_ANALYSIS = '''
import jax.stages
def unavailable(self):
  raise NotImplementedError('cost analysis is not implemented on this backend')
jax.stages.Lowered.cost_analysis = jax.stages.Compiled.cost_analysis = unavailable
from absl import app
from cvjax.tools import benchmark
app.run(benchmark.main, argv=['benchmark', '--model=lenet5', '--batch_size=8', '--steps=1',
                              '--warmup=0', '--variants=one_program', '--conv=xla',
                              '--population=1', '--matmul_size=512'])
'''


@pytest.mark.slow
def test_benchmark_keeps_its_results_line_without_a_flop_count(tmp_path):
  out = subprocess.run([sys.executable, '-c', NO_COST_ANALYSIS], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=child_env(CVJAX_NATIVE='0'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'no FLOP count (NotImplementedError' in out.stdout
  result = json.loads(out.stdout.strip().splitlines()[-1])
  (row,), (member,) = result['results'], result['population']
  assert row['train_images_per_s'] > 0 and member['train_images_per_s'] > 0
  assert row['gflops_per_step'] is row['mfu'] is member['achieved_gflops_per_s'] is None
  # The results file takes such rows (cvjax.tools.gpu_results).
  bench = tmp_path / 'bench.jsonl'
  (tmp_path / 'runs').mkdir()
  bench.write_text(json.dumps(result) + '\n')
  made = subprocess.run([sys.executable, '-m', 'cvjax.tools.gpu_results',
                         f'--benchmarks={bench}', f'--runs={tmp_path / "runs"}',
                         f'--out={tmp_path / "gpu.json"}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert made.returncode == 0, made.stderr[-3000:]
