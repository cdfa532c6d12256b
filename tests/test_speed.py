"""The optimised step computes what the plain one does; the benchmark runs end to end."""

import functools
import json
import subprocess
import sys

import jax
from jax import lax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from cvjax import train
from cvjax.ops import convolution
from cvjax.ops import onednn

pytestmark = pytest.mark.slow  # Benchmarks and bf16 training.


def test_optimised_step_matches_the_straightforward_one(idx_dir, tmp_path, monkeypatch):
  # Straightforward: one program, autodiff's convolutions. Optimised (the default): split
  # forward/backward, cvjax.ops.convolution's (oneDNN's where it builds). f32, 8 SGD steps with BatchNorm.
  # Tolerance: float reassociation only.
  kw = {'train.num_steps': 8, 'train.eval_every_steps': 8}
  with monkeypatch.context() as m:
    m.setattr(convolution, 'for_config', lambda config: lax.conv_general_dilated)
    one, _ = train.train_and_evaluate(
        tiny_config(idx_dir, **kw, **{'train.split_backward': False}), str(tmp_path / 'one'))
  split, _ = train.train_and_evaluate(tiny_config(idx_dir, **kw, **{'train.split_backward': True}),
                                      str(tmp_path / 'split'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get((one.params, one.model_state)),
               jax.device_get((split.params, split.model_state)))


def test_bfloat16_compute_trains(idx_dir, tmp_path):
  state, test = train.train_and_evaluate(
      tiny_config(idx_dir, **{'train.compute_dtype': 'bfloat16', 'train.num_steps': 4}),
      str(tmp_path))
  # Parameters stay float32; the loss is finite.
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(test['test/loss'])


def run_benchmark(*flags):
  """The JSON line (its last) of `python -m cvjax.tools.benchmark FLAGS`, with a 512x512 matmul
  for the MFU roof: the 4096x4096 ones take minutes on a loaded 2-core CPU (bfloat16 most), and
  no assertion needs a precise roof."""
  out = subprocess.run([sys.executable, '-m', 'cvjax.tools.benchmark', '--matmul_size=512',
                        *flags], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_benchmark_prints_its_json_and_times_populations():
  # One child for both tables: LeNet-5's step variants and convolutions, and its populations.
  result = run_benchmark('--model=lenet5', '--batch_size=8', '--steps=2', '--warmup=0',
                         '--population=1,2', '--steps_per_call=1,2')
  rows = {(r['model'], r['variant'], r['conv']): r for r in result['results']}
  # Both convolution paths where the oneDNN one can be built.
  convs = ('xla',) if onednn.unbuildable_reason() else ('native', 'xla')
  assert set(rows) == {('lenet5', v, c) for v in ('one_program', 'split') for c in convs}
  roof = result['mfu_roof_gflops_per_s']['float32']
  assert roof == result['matmul_gflops_per_s']['float32'] > 0
  for r in rows.values():
    assert r['train_images_per_s'] > 0 and r['step_ms_median'] > 0
    assert r['step_ms_p90'] >= r['step_ms_median'] and r['eval_images_per_s'] > 0
    assert r['gflops_per_step'] > 0 and r['achieved_gflops_per_s'] == pytest.approx(
        r['gflops_per_step'] / r['step_ms_median'] * 1e3)
    # MFU against the matmul measured in the run (a loaded machine slows the matmul as much as
    # the step: no bound on it here); the bound is the CPU's nominal peak (cvjax.tools.cpu_peak).
    assert r['mfu'] == pytest.approx(r['achieved_gflops_per_s'] / roof)
    assert 0 < r['fraction_of_cpu_peak'] < 1
    assert r['cpu_peak_gflops_per_s'] == result['cpu']['peak_gflops_per_s']['float32']
  # The population table: P members, K steps per call.
  pop = {(r['members'], r['steps_per_call']): r for r in result['population']}
  assert set(pop) == {(1, 1), (1, 2), (2, 1), (2, 2)}
  for (members, _), r in pop.items():
    assert r['model'] == 'lenet5' and r['dtype'] == 'float32' and r['train_images_per_s'] > 0
    assert r['member_step_ms'] * members == pytest.approx(r['step_ms_median'])
    # A population's step is its members' steps: P times one member's FLOPs, which are those
    # of the single run's step.
    assert r['gflops_per_step'] == pytest.approx(members * pop[1, 1]['gflops_per_step'])
    assert pop[1, 1]['gflops_per_step'] == pytest.approx(rows['lenet5', 'one_program', 'xla'][
        'gflops_per_step'])
    assert r['achieved_gflops_per_s'] == pytest.approx(
        r['gflops_per_step'] / r['step_ms_median'] * 1e3)


def test_benchmark_runs_an_imagenet_resnet():
  # The GPU/TPU recipe's model (1000 classes) at 64x64 (--image_size; the 7x7 stem kept), a tiny
  # batch: every layer's output is 224/64 = 3.5 times smaller each way than at 224x224. One row
  # (oneDNN's where it builds, else XLA's): the FLOP count is XLA's count of the same step for
  # either, so a second row would compile a second ResNet-18 to check the same number.
  result = run_benchmark('--model=imagenet_resnet18', '--image_size=64', '--batch_size=2',
                         '--steps=1', '--warmup=0', '--variants=split', '--dtype=bfloat16',
                         '--conv=native')
  (row,) = result['results']
  assert row['conv'] in ('native', 'xla')  # oneDNN's row, if it builds here.
  assert row['model'] == 'imagenet_resnet18' and row['dtype'] == 'bfloat16'
  # ResNet-18 forward is ~3.4 GFLOP per 224x224 image, (64/224)^2 of it at 64x64 (the 1000-way
  # head's 1 MFLOP aside); a train step ~3x the forward per image.
  area = (64 / 224) ** 2
  assert 2 * 3 * 3.0 * area < row['gflops_per_step'] < 2 * 3 * 4.0 * area


def test_benchmark_counts_flops_of_the_whole_network_when_blocks_are_scanned():
  # XLA's cost analysis counts a loop body once; the benchmark counts the unscanned net.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cvjax import optim  # pylint: disable=g-import-not-at-top
  from cvjax.tools import benchmark  # pylint: disable=g-import-not-at-top
  from cvjax import sharding  # pylint: disable=g-import-not-at-top
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(benchmark.model_config('resnet20'))
  train_batch = functools.partial(memory.train_batch, crop_padding=4, flip=True)
  data = {'train_images': np.zeros((8, 32, 32, 3), np.uint8),
          'train_labels': np.zeros(8, np.int32),
          'mean': np.zeros((1, 1, 1, 1), np.float32), 'std': np.ones((1, 1, 1, 1), np.float32)}
  args = (data, {'indices': jnp.arange(4)}, jax.random.key(0))
  flops = {}
  for depth in (20, 32):
    for scan in (False, True):
      config = benchmark.model_config(f'resnet{depth}')
      config.model.scan_blocks = scan
      tx = optim.make_optimizer(config.optimizer, 0.1)
      flops[depth, scan] = benchmark.step_flops(config, tx, mesh, (32, 32, 3), 10, train_batch,
                                                 args)
  assert flops[20, True] == flops[20, False] and flops[32, True] == flops[32, False]
  assert flops[32, False] > 1.5 * flops[20, False]  # 12 more layers of the same stages
