"""The mixed-precision CPU step (`train.compute_dtype=bfloat16` on oneDNN's bfloat16
convolutions): it trains like the float32 step, and on a CPU without bfloat16 instructions it
is the float32 step, said once in the log."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, child_env, tiny_config
from cvjax.ops import convolution
from cvjax.ops import onednn


def read_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['train/loss']) for r in map(json.loads, f) if 'train/loss' in r]


@pytest.mark.slow
def test_bfloat16_loss_curve_follows_float32(idx_dir, tmp_path):
  # ResNet-8, 150 SGD steps on the tiny bars data, the same seed and batches: the bfloat16
  # step (oneDNN bfloat16 convolutions, float32 parameters, optimizer state, BatchNorm
  # statistics and loss) against the float32 step. The two runs drift apart (each step rounds
  # activations to 8 bits of mantissa, and SGD amplifies differences), so the curves are
  # compared as curves: each logged loss (mean over 5 steps) within 0.15 + 25% of the float32
  # one, and both runs learn (final loss below a third of the first).
  if onednn.unbuildable_reason() or not onednn.available() or not onednn.bf16():
    pytest.skip('no oneDNN bfloat16 kernels on this CPU')
  from cvjax import train  # pylint: disable=g-import-not-at-top
  kw = {'train.num_steps': 150, 'train.log_every_steps': 5, 'train.eval_every_steps': 150,
        'train.checkpoint_every_steps': 150}
  curves, finals = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(idx_dir, **kw, **{'train.compute_dtype': dtype})
    assert convolution.native_for(config) and convolution.compute_dtype(config) == dtype
    state, test = train.train_and_evaluate(config, str(tmp_path / dtype))
    assert all(p.dtype == np.float32 for p in __import__('jax').tree.leaves(state.params))
    curves[dtype], finals[dtype] = read_losses(tmp_path / dtype), test
  steps32, f32 = zip(*curves['float32'])
  steps16, bf16 = zip(*curves['bfloat16'])
  assert steps32 == steps16 and len(steps32) == 30
  f32, bf16 = np.array(f32), np.array(bf16)
  assert np.all(np.isfinite(bf16))
  assert np.all(np.abs(bf16 - f32) <= 0.15 + 0.25 * f32), np.stack([f32, bf16])
  assert bf16[-1] < bf16[0] / 3 and f32[-1] < f32[0] / 3
  assert abs(finals['bfloat16']['test/error'] - finals['float32']['test/error']) <= 0.1


FALLBACK = '''
import logging, io
from absl import logging as absl_logging
import jax, numpy as np
from conftest import tiny_config
from cvjax import train
from cvjax.ops import convolution, onednn
assert onednn.available() and not onednn.bf16(), onednn.bf16_kernel()
states = {}
for dtype in ('bfloat16', 'float32', 'bfloat16'):
  config = tiny_config(%(idx)r, **{'train.compute_dtype': dtype, 'train.num_steps': 4})
  assert convolution.compute_dtype(config) == np.float32 and convolution.native_for(config)
  state, _ = train.train_and_evaluate(config, %(tmp)r + '/' + dtype + str(len(states)))
  states[len(states)] = jax.device_get((state.params, state.model_state))
jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
print('FLOAT32 BITS')
'''


@pytest.mark.slow
def test_bfloat16_falls_back_to_float32_without_bfloat16_instructions(idx_dir, tmp_path):
  # oneDNN capped at AVX2 (an AMD Zen 3 / Intel AVX2 CPU): a bfloat16 config computes in
  # float32, bit for bit the float32 run, and the log says so once (two bfloat16 runs).
  if onednn.unbuildable_reason() or os.environ.get('CVJAX_NATIVE') == '0':
    pytest.skip('oneDNN convolutions cannot be built here')
  out = subprocess.run([sys.executable, '-c', FALLBACK % dict(idx=idx_dir, tmp=str(tmp_path))],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=child_env(ONEDNN_MAX_CPU_ISA='AVX2'))
  assert out.returncode == 0 and 'FLOAT32 BITS' in out.stdout, out.stderr[-3000:]
  assert out.stderr.count('no avx512_bf16 or AMX): computing in float32') == 1, out.stderr[-3000:]
