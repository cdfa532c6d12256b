"""Collects what experiments/gpu_check.sh measured into one JSON file (docs/results/gpu.json).

  python -m cvjax.tools.gpu_results --benchmarks=OUT/benchmark.jsonl --runs=RUNS \
      --out=docs/results/gpu.json

Benchmark rows come from cvjax.tools.benchmark's JSON lines; MFU is taken against the chip's
published dense bf16 peak (the benchmark's own MFU uses a matmul it measures). Runs come
from each run folder: results.json when the run finished, else its last logged metrics.
A call that ran no benchmark (a resumed training call) keeps the benchmark rows of --out.
"""

import datetime
import json
import os

from absl import app
from absl import flags

_BENCH = flags.DEFINE_string('benchmarks', None, 'cvjax.tools.benchmark JSON lines.')
_RUNS = flags.DEFINE_string('runs', None, 'Folder of cvjax.main workdirs.')
_OUT = flags.DEFINE_string('out', 'docs/results/gpu.json', 'Where to write.')

# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {'H100 PCIe': 756.0, 'H100': 989.4, 'H200': 989.4, 'A100': 312.0}


def chip_peak(device):
  for name, peak in BF16_PEAK_TFLOPS.items():  # The most specific name first.
    if name in device:
      return peak
  return None


def benchmark_rows(path):
  rows, device, jax_version = [], None, None
  with open(path) as f:
    for line in f:
      if not line.startswith('{'):
        continue
      run = json.loads(line)
      device, jax_version = run['device'], run['jax']
      peak = chip_peak(device)
      for r in run['results']:
        if r['variant'].startswith('torch'):
          continue
        rows.append({
            'model': r['model'], 'dtype': r['dtype'], 'batch_size': run['batch_size'],
            'variant': r['variant'], 'xla_flags': run.get('xla_flags', ''),
            'images_per_second': round(r['train_images_per_s'], 1),
            'step_ms': round(r['step_ms_median'], 3), 'compile_s': round(r['compile_s'], 2),
            'eval_images_per_second': round(r['eval_images_per_s'], 1),
            'tflops_per_second': round(r['achieved_gflops_per_s'] / 1e3, 2),
            'mfu_vs_bf16_peak': (round(r['achieved_gflops_per_s'] / 1e3 / peak, 4)
                                 if peak else None)})
  return rows, device, jax_version


def run_rows(folder):
  rows = []
  for name in sorted(os.listdir(folder)):
    workdir = os.path.join(folder, name)
    if not os.path.isdir(workdir):
      continue
    wall = 0.0
    if os.path.exists(os.path.join(workdir, 'wall_seconds')):  # One line per call.
      with open(os.path.join(workdir, 'wall_seconds')) as f:
        wall = sum(float(x) for x in f.read().split())
    row = {'name': name, 'wall_seconds': wall}
    results = os.path.join(workdir, 'results.json')
    if os.path.exists(results):
      with open(results) as f:
        r = json.load(f)
      row.update(steps=r['step'], test_error=r['test/error'], finished=True)
    else:  # Stopped early: the steps logged so far, and the last evaluation among them.
      records = []
      if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
          records = [json.loads(line) for line in f if line.strip()]
      evals = [r for r in records if 'test/error' in r]
      row.update(steps=records[-1]['step'] if records else 0,
                 test_error=evals[-1]['test/error'] if evals else None, finished=False)
    rows.append(row)
  return rows


def main(argv):
  del argv
  benchmark, device, jax_version = benchmark_rows(_BENCH.value)
  if not benchmark and os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      earlier = json.load(f)
    benchmark, device, jax_version = earlier['benchmark'], earlier['device'], earlier['jax']
  if device is None:  # No benchmark yet: name the device the runs ran on.
    import jax  # pylint: disable=g-import-not-at-top
    device, jax_version = jax.devices()[0].device_kind, jax.__version__
  out = {'device': device, 'jax': jax_version,
         'date': datetime.date.today().isoformat(), 'benchmark': benchmark,
         'runs': run_rows(_RUNS.value)}
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  flags.mark_flags_as_required(['benchmarks', 'runs'])
  app.run(main)
