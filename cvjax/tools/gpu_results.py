"""Collects what experiments/gpu_check.sh measured into one JSON file (docs/results/gpu.json).

  python -m cvjax.tools.gpu_results --benchmarks=OUT/benchmark.jsonl --runs=RUNS \
      --out=docs/results/gpu.json

Benchmark rows come from cvjax.tools.benchmark's JSON lines: its one-run rows (population 1,
one step per dispatch) and its population rows (`--population`, `--steps_per_call`); MFU is
taken against the chip's published dense bf16 peak (the benchmark's own MFU uses a matmul it
measures).

Runs come from the folders in --runs, each a cvjax.main workdir: a population's
(results.json with every member's, members/<name>/) or a single run's. A population is
reported by group, one entry per set of `population.vary` values (its members differ by the
seed alone: e.g. the residual and the plain nets of one depth), since a mean over a plain and
a residual net means nothing. A finished run's numbers are its results.json's; an unfinished
one's are each member's last logged evaluation (members/<name>/metrics.jsonl), with the step
it was taken at. `wall_seconds` is the time of the calls that trained the folder (one line per
call in its wall_seconds file), shared by the groups trained in its one program.
A call that ran no benchmark (a resumed training call) keeps the benchmark rows of --out.
"""

import datetime
import json
import os
import re

from absl import app
from absl import flags
import numpy as np

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


def _throughput(r, peak):
  gflops = r.get('achieved_gflops_per_s')  # None where the backend gave no FLOP count.
  tflops = gflops / 1e3 if gflops is not None else None
  return {'tflops_per_second': round(tflops, 2) if tflops is not None else None,
          'mfu_vs_bf16_peak': round(tflops / peak, 4) if tflops is not None and peak else None}


def benchmark_rows(path):
  rows, device, jax_version = [], None, None
  with open(path) as f:
    for line in f:
      if not line.startswith('{'):
        continue
      run = json.loads(line)
      device, jax_version = run['device'], run['jax']
      peak, flags_ = chip_peak(device), run.get('xla_flags', '')
      for r in run['results']:
        if r['variant'].startswith('torch'):
          continue
        rows.append({
            'model': r['model'], 'dtype': r['dtype'], 'batch_size': run['batch_size'],
            'population': 1, 'steps_per_call': 1, 'variant': r['variant'], 'xla_flags': flags_,
            'images_per_second': round(r['train_images_per_s'], 1),
            'images_per_second_per_member': round(r['train_images_per_s'], 1),
            'step_ms': round(r['step_ms_median'], 3), 'compile_s': round(r['compile_s'], 2),
            'eval_images_per_second': round(r['eval_images_per_s'], 1), **_throughput(r, peak)})
      for r in run.get('population', []):
        rows.append({
            'model': r['model'], 'dtype': r.get('dtype'), 'batch_size': run['batch_size'],
            'population': r['members'], 'steps_per_call': r['steps_per_call'],
            'variant': r['variant'], 'xla_flags': flags_,
            'images_per_second': round(r['train_images_per_s'], 1),
            'images_per_second_per_member': round(r['train_images_per_s'] / r['members'], 1),
            'step_ms': round(r['step_ms_median'], 3),
            'member_step_ms': round(r['member_step_ms'], 3),
            'cost_vs_singles': (round(r['cost_vs_singles'], 3)
                                if r.get('cost_vs_singles') is not None else None),
            'compile_s': round(r['compile_s'], 2), **_throughput(r, peak)})
  return rows, device, jax_version


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _records(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _group(member):
  """'residualFalse_seed3' -> 'residualFalse': the member's name without its seed."""
  return re.sub(r'_?seed-?\d+$', '', member)


def _stats(values):
  """{mean, std (ddof 1; None for one value), per_member} of {member: value or None}."""
  known = [v for v in values.values() if v is not None]
  return {'mean': float(np.mean(known)) if known else None,
          'std': float(np.std(known, ddof=1)) if len(known) > 1 else None,
          'per_member': values}


def _curve(records_by_member):
  """[[step, mean, std]] of the members' test errors at each evaluated step."""
  by_step = {}
  for member, records in records_by_member.items():
    for r in records:
      if 'test/error' in r:
        by_step.setdefault(r['step'], {})[member] = r['test/error']
  out = []
  for step in sorted(by_step):
    s = _stats(by_step[step])
    out.append([step, round(s['mean'], 5), round(s['std'], 5) if s['std'] is not None else None])
  return out


def _wall_seconds(workdir):
  path = os.path.join(workdir, 'wall_seconds')  # One line per call.
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return sum(float(x) for x in f.read().split())


def run_rows(folder):
  rows = []
  for name in sorted(os.listdir(folder)):
    workdir = os.path.join(folder, name)
    if not os.path.isdir(workdir):
      continue
    wall = _wall_seconds(workdir)
    results_file = os.path.join(workdir, 'results.json')
    results = _read_json(results_file) if os.path.exists(results_file) else None
    members_dir = os.path.join(workdir, 'members')
    if os.path.isdir(members_dir):  # A population.
      member_dirs = {m: os.path.join(members_dir, m) for m in sorted(os.listdir(members_dir))
                     if os.path.isdir(os.path.join(members_dir, m))}
    else:  # A single run: its own one member.
      member_dirs = {name: workdir}
      if results is not None:
        results = {'step': results['step'], 'members': {name: results}}
    records = {m: _records(os.path.join(d, 'metrics.jsonl')) for m, d in member_dirs.items()}
    last = {m: [r for r in rs if 'test/error' in r][-1:] for m, rs in records.items()}
    groups = {}
    for m in member_dirs:
      groups.setdefault(_group(m), []).append(m)
    for group, members in groups.items():
      row = {'name': f'{name}/{group}' if group and group != name else name,
             'workdir': name, 'members': len(members), 'wall_seconds': wall}
      if results is not None:  # Finished: every member's final evaluation.
        row.update(steps=results['step'], finished=True, test_error=_stats(
            {m: results['members'][m]['test/error'] for m in members}),
            test_error_step=results['step'])
      else:  # Stopped early: the steps logged so far, each member's last evaluation.
        steps = [rs[-1]['step'] for m, rs in records.items() if m in members and rs]
        evaluated = [last[m][0]['step'] for m in members if last[m]]
        row.update(steps=min(steps) if steps else 0, finished=False, test_error=_stats(
            {m: last[m][0]['test/error'] if last[m] else None for m in members}),
            test_error_step=min(evaluated) if evaluated else None)
      ips = [r['train/images_per_second'] for r in records[members[0]]
             if r.get('train/images_per_second')]
      row['images_per_second'] = round(float(np.median(ips)), 1) if ips else None
      row['test_error_curve'] = _curve({m: records[m] for m in members})
      rows.append(row)
  return rows


def main(argv):
  del argv
  benchmark, device, jax_version = benchmark_rows(_BENCH.value)
  if not benchmark and os.path.exists(_OUT.value):
    earlier = _read_json(_OUT.value)
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
