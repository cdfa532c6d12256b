"""A population split over the processes of a multi-process run (tests/test_multiprocess.py
has the workers and the rest): a file of its own, the longest of them, so that a parallel run
of the suite (pytest-xdist, a file per worker) runs it beside the others."""

import json
import os
import shutil

import numpy as np
import pytest

from test_multiprocess import ATOL, RTOL, assert_same, load, run

pytestmark = pytest.mark.slow  # Real processes joined by jax.distributed.


def test_a_population_split_over_two_processes_equals_one_process(idx_dir, tmp_path):
  """population.seeds=4 on 4 devices of 2 processes: each member on one device, so the state
  and the train metrics are split over the processes (the host pulls only what it may). It
  trains, checkpoints and resumes to every member's metrics of the 1-process run."""
  pop = {'population.seeds': 4}
  out = {}
  for name, nproc in (('one', 1), ('two', 2)):
    codes, logs = run(nproc, tmp_path / name, tmp_path / f'{name}.out', idx_dir, pop)
    assert codes == [0] * nproc, '\n'.join(l[-3000:] for l in logs)
    assert 'members split over the devices' in logs[0]
    out[name] = load(tmp_path / f'{name}.out')
  assert set(out['one'][1]['metrics']) == {'seed0', 'seed1', 'seed2', 'seed3'}
  # Interrupted after the step-4 checkpoint, resumed by 2 processes.
  resumed = tmp_path / 'two'
  for step in ('8', '12'):
    shutil.rmtree(resumed / 'checkpoints' / step)
  os.remove(resumed / 'results.json')
  codes, logs = run(2, resumed, tmp_path / 'resumed.out', idx_dir, pop)
  assert codes == [0, 0], '\n'.join(l[-3000:] for l in logs)
  assert 'Resuming from the checkpoint at step 4' in logs[0]
  out['resumed'] = load(tmp_path / 'resumed.out')
  for name in ('two', 'resumed'):
    assert out[name][1]['step'] == 12
    assert_same(out['one'][0], out[name][0], RTOL, ATOL)
    for member, metrics in out['one'][1]['metrics'].items():
      for k, v in metrics.items():
        np.testing.assert_allclose(out[name][1]['metrics'][member][k], v, rtol=1e-4, atol=1e-6)
  rows = [json.loads(l) for l in open(resumed / 'members' / 'seed3' / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'train/loss' in r] == [4, 8, 12]
