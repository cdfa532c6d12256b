"""The GPU check's results collector (cvjax/tools/gpu_results.py) on made-up inputs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(tmp_path, bench_lines):
  (tmp_path / 'bench.jsonl').write_text(''.join(json.dumps(b) + '\n' for b in bench_lines))
  out = tmp_path / 'gpu.json'
  proc = subprocess.run(
      [sys.executable, 'cvjax/tools/gpu_results.py', f'--benchmarks={tmp_path / "bench.jsonl"}',
       f'--runs={tmp_path / "runs"}', f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(out.read_text())


def test_benchmark_rows_runs_and_resumed_calls(tmp_path):
  row = {'model': 'imagenet_resnet50', 'variant': 'one_program', 'dtype': 'bfloat16',
         'train_images_per_s': 3000.0, 'step_ms_median': 85.3, 'compile_s': 40.0,
         'eval_images_per_s': 9000.0, 'achieved_gflops_per_s': 494_700.0}
  torch_row = {**row, 'variant': 'torch 2 eager'}
  bench = {'jax': '0.11.0', 'device': 'NVIDIA H100 80GB HBM3', 'batch_size': 256,
           'results': [row, torch_row], 'xla_flags': ''}
  finished, stopped = tmp_path / 'runs' / 'resnet20', tmp_path / 'runs' / 'plain20'
  finished.mkdir(parents=True)
  stopped.mkdir()
  (finished / 'results.json').write_text(json.dumps({'step': 64000, 'test/error': 0.0861}))
  (finished / 'wall_seconds').write_text('300\n120\n')  # Two calls.
  (stopped / 'metrics.jsonl').write_text(
      '{"step": 2000, "test/error": 0.5}\n{"step": 2100, "train/loss": 1.0}\n'
      '{"step": 4000, "test/error": 0.4}\n')
  out = _collect(tmp_path, [bench])
  assert (out['device'], out['jax']) == ('NVIDIA H100 80GB HBM3', '0.11.0')
  [b] = out['benchmark']  # PyTorch rows are not cvjax's.
  assert b['images_per_second'] == 3000.0 and b['batch_size'] == 256
  assert abs(b['mfu_vs_bf16_peak'] - 494.7 / 989.4) < 1e-4  # H100 SXM: 989.4 TFLOP/s bf16.
  runs = {r['name']: r for r in out['runs']}
  assert runs['resnet20'] == {'name': 'resnet20', 'wall_seconds': 420.0, 'steps': 64000,
                              'test_error': 0.0861, 'finished': True}
  assert runs['plain20'] == {'name': 'plain20', 'wall_seconds': 0.0, 'steps': 4000,
                             'test_error': 0.4, 'finished': False}
  # A later call that only resumed training keeps the benchmark rows it found.
  again = _collect(tmp_path, [])
  assert again['benchmark'] == out['benchmark'] and again['device'] == out['device']
