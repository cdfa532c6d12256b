"""The GPU check's results collector (cvjax/tools/gpu_results.py) on made-up inputs."""

import json
import os
import subprocess
import sys

import pytest

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


def _write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def _bench():
  row = {'model': 'imagenet_resnet50', 'variant': 'one_program', 'dtype': 'bfloat16',
         'train_images_per_s': 3000.0, 'step_ms_median': 85.3, 'compile_s': 40.0,
         'eval_images_per_s': 9000.0, 'achieved_gflops_per_s': 494_700.0}
  torch_row = {**row, 'variant': 'torch 2 eager'}
  single = {'model': 'resnet20', 'members': 1, 'steps_per_call': 1, 'dtype': 'float32',
            'variant': 'one_program', 'step_ms_median': 4.0, 'member_step_ms': 4.0,
            'train_images_per_s': 32_000.0, 'compile_s': 12.0, 'gflops_per_step': 28.76,
            'achieved_gflops_per_s': 7190.0, 'cost_vs_singles': 1.0}
  population = {**single, 'members': 10, 'steps_per_call': 20, 'step_ms_median': 10.0,
                'member_step_ms': 1.0, 'train_images_per_s': 128_000.0, 'compile_s': 30.0,
                'gflops_per_step': 287.6, 'achieved_gflops_per_s': 28_760.0,
                'cost_vs_singles': 0.25}
  return [{'jax': '0.11.0', 'device': 'NVIDIA H100 80GB HBM3', 'batch_size': 256,
           'results': [row, torch_row], 'population': [], 'xla_flags': ''},
          {'jax': '0.11.0', 'device': 'NVIDIA H100 80GB HBM3', 'batch_size': 128,
           'results': [], 'population': [single, population], 'xla_flags': ''}]


def test_benchmark_rows_one_run_and_populations(tmp_path):
  (tmp_path / 'runs').mkdir()
  out = _collect(tmp_path, _bench())
  assert (out['device'], out['jax']) == ('NVIDIA H100 80GB HBM3', '0.11.0')
  rows = {(b['model'], b['population'], b['steps_per_call']): b for b in out['benchmark']}
  assert set(rows) == {('imagenet_resnet50', 1, 1), ('resnet20', 1, 1), ('resnet20', 10, 20)}
  r50 = rows['imagenet_resnet50', 1, 1]  # PyTorch rows are not cvjax's.
  assert r50['images_per_second'] == 3000.0 and r50['batch_size'] == 256
  assert abs(r50['mfu_vs_bf16_peak'] - 494.7 / 989.4) < 1e-4  # H100 SXM: 989.4 TFLOP/s bf16.
  pop = rows['resnet20', 10, 20]
  assert (pop['batch_size'], pop['dtype'], pop['images_per_second'],
          pop['images_per_second_per_member'], pop['step_ms'], pop['member_step_ms'],
          pop['cost_vs_singles'], pop['tflops_per_second']) == (
              128, 'float32', 128_000.0, 12_800.0, 10.0, 1.0, 0.25, 28.76)
  assert abs(pop['mfu_vs_bf16_peak'] - 28.76 / 989.4) < 1e-4


def test_populations_by_group_finished_and_stopped_and_a_resumed_call(tmp_path):
  runs = tmp_path / 'runs'
  # A finished population of ResNet/plain twins, two seeds each, trained over two calls.
  done = runs / 'depth20'
  errors = {'residualFalse_seed0': 0.10, 'residualFalse_seed1': 0.12,
            'residualTrue_seed0': 0.08, 'residualTrue_seed1': 0.09}
  for name, e in errors.items():
    _write_jsonl(done / 'members' / name / 'metrics.jsonl', [
        {'step': 100, 'train/loss': 2.0, 'train/images_per_second': 5000.0},
        {'step': 200, 'train/loss': 1.0, 'train/images_per_second': 7000.0},
        {'step': 200, 'test/error': e}])
  (done / 'results.json').write_text(json.dumps(
      {'step': 200, 'members': {n: {'step': 200, 'test/error': e} for n, e in errors.items()},
       'mean': {'test/error': 0.0975}, 'std': {'test/error': 0.017}}))
  (done / 'wall_seconds').write_text('300\n120\n')
  # A population stopped by the call's time limit: each member's last evaluation; one member
  # whose log has no evaluation yet.
  stopped = runs / 'depth56'
  for name, curve in {'residualTrue_seed0': [0.5, 0.4], 'residualTrue_seed1': [0.6, 0.3],
                      'residualFalse_seed0': [0.7, 0.6], 'residualFalse_seed1': []}.items():
    _write_jsonl(stopped / 'members' / name / 'metrics.jsonl',
                 [{'step': 1000 * (i + 1), 'test/error': e} for i, e in enumerate(curve)]
                 + [{'step': 2100, 'train/loss': 1.0}])
  (stopped / 'wall_seconds').write_text('250\n')
  # Single runs (no members/): a finished one and one stopped early.
  (runs / 'resnet20').mkdir()
  (runs / 'resnet20' / 'results.json').write_text(json.dumps({'step': 64000,
                                                              'test/error': 0.0861}))
  _write_jsonl(runs / 'plain20' / 'metrics.jsonl', [
      {'step': 2000, 'test/error': 0.5}, {'step': 2100, 'train/loss': 1.0},
      {'step': 4000, 'test/error': 0.4}])

  out = _collect(tmp_path, _bench())
  got = {r['name']: r for r in out['runs']}
  assert set(got) == {'depth20/residualFalse', 'depth20/residualTrue', 'depth56/residualFalse',
                      'depth56/residualTrue', 'resnet20', 'plain20'}
  res20 = got['depth20/residualTrue']
  assert (res20['workdir'], res20['members'], res20['steps'], res20['finished'],
          res20['wall_seconds'], res20['images_per_second']) == (
              'depth20', 2, 200, True, 420.0, 6000.0)
  assert res20['test_error']['per_member'] == {'residualTrue_seed0': 0.08,
                                               'residualTrue_seed1': 0.09}
  assert res20['test_error']['mean'] == pytest.approx(0.085)
  assert res20['test_error']['std'] == pytest.approx(0.01 / 2 ** 0.5)  # ddof=1.
  assert got['depth20/residualFalse']['test_error']['mean'] == pytest.approx(0.11)

  res56 = got['depth56/residualTrue']
  assert (res56['steps'], res56['finished'], res56['test_error_step'],
          res56['wall_seconds']) == (2100, False, 2000, 250.0)
  assert res56['test_error']['mean'] == pytest.approx(0.35)
  assert res56['test_error_curve'] == [[1000, 0.55, pytest.approx(0.07071, abs=1e-5)],
                                       [2000, 0.35, pytest.approx(0.07071, abs=1e-5)]]
  plain56 = got['depth56/residualFalse']
  assert plain56['test_error'] == {'mean': 0.6, 'std': None, 'per_member': {
      'residualFalse_seed0': 0.6, 'residualFalse_seed1': None}}

  assert {k: got['resnet20'][k] for k in ('members', 'steps', 'finished', 'wall_seconds')} == {
      'members': 1, 'steps': 64000, 'finished': True, 'wall_seconds': 0.0}
  assert got['resnet20']['test_error'] == {'mean': 0.0861, 'std': None,
                                           'per_member': {'resnet20': 0.0861}}
  assert (got['plain20']['steps'], got['plain20']['test_error']['mean'],
          got['plain20']['test_error_step'], got['plain20']['finished']) == (4000, 0.4, 4000,
                                                                             False)
  # A later call that only resumed training keeps the benchmark rows it found.
  again = _collect(tmp_path, [])
  assert again['benchmark'] == out['benchmark'] and again['device'] == out['device']
