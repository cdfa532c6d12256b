"""cvjax.ops.convolution gives the same values and gradients as lax's own convolution, on
both of its CPU paths: oneDNN custom calls (native) and XLA's convolutions (xla), also when
XLA runs many of the custom calls at once (the stress tests at the end)."""

import functools
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import ROOT, child_env
from cvjax.ops import convolution
from cvjax.ops import onednn

DIMS = ('NHWC', 'HWIO', 'NHWC')
NATIVE = functools.partial(convolution.conv_general_dilated, native=True)


@pytest.fixture(params=['native', 'xla'])
def backend(request):
  """Runs a test on each path; `native` must work wherever it can be built."""
  if request.param == 'native':
    require_native()
  return request.param


def conv_of(backend):
  return NATIVE if backend == 'native' else convolution.conv_general_dilated


def require_native():
  """Skips only where the library cannot be built here (no g++, no oneDNN wheel, not
  Linux x86-64, CVJAX_NATIVE=0); anywhere else a failed build fails the test."""
  reason = onednn.unbuildable_reason()
  if reason or os.environ.get('CVJAX_NATIVE') == '0':
    pytest.skip(f'oneDNN convolutions cannot be built here: {reason or "CVJAX_NATIVE=0"}')
  assert onednn.available(), onednn._load()[1]


def test_processes_starting_together_build_the_library_once(tmp_path, monkeypatch):
  """Two builders at once (test workers, a sweep's trials): one compiles, the other waits for
  its library instead of compiling a second copy."""
  if onednn.unbuildable_reason():
    pytest.skip(onednn.unbuildable_reason())
  monkeypatch.setenv('CVJAX_CACHE_DIR', str(tmp_path))
  compiled, started = [], threading.Barrier(2)

  def slow_compile(out, *args):
    del args
    compiled.append(out)
    threading.Event().wait(0.5)  # Long enough for the other builder to find no library.
    out.write_bytes(b'library')

  monkeypatch.setattr(onednn, '_compile', slow_compile)
  paths = []

  def builder():
    started.wait()
    paths.append(onednn.build())

  threads = [threading.Thread(target=builder) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(compiled) == 1 and paths == compiled * 2, (compiled, paths)


def custom_calls(f, *args):
  """FFI targets in the compiled program of f(*args)."""
  text = jax.jit(f).lower(*args).compile().as_text()
  return {t for t in ('cvjax_CvjaxConvForward', 'cvjax_CvjaxConvBackward') if t in text}


def _loss(conv, strides, padding, **kw):
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=DIMS, **kw)))


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME'),        # CIFAR ResNet 3x3
    ((2, 8, 8, 4), (3, 3, 4, 8), (2, 2), 'SAME'),        # stride-2 first block of a stage
    ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), 'VALID'),     # LeNet C1
    ((1, 31, 31, 3), (11, 11, 3, 4), (4, 4), 'VALID'),   # AlexNet conv1 (smaller image)
    ((2, 15, 17, 4), (1, 1, 4, 4), (2, 2), 'SAME'),      # 1x1 projection, odd sizes
    ((2, 9, 9, 4), (3, 3, 4, 5), (2, 1), ((1, 2), (0, 1))),  # asymmetric everything
    ((2, 14, 14, 4), (7, 7, 4, 4), (2, 2), ((3, 3), (3, 3))),  # ImageNet ResNet stem
    ((2, 10, 10, 3), (3, 3, 3, 4), (2, 2), ((0, -1), (1, -2))),  # negative (cropping) padding
    ((2, 9, 9, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1))),  # stride 2, explicit pad 1
    ((2, 8, 8, 4), (5, 5, 2, 6), (1, 1), 'SAME'),        # AlexNet conv2: two groups
])
@pytest.mark.slow
def test_gradients_match_autodiff(backend, shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  groups = shape[-1] // kernel[2]
  loss = lambda conv: _loss(conv, strides, padding, feature_group_count=groups)
  want = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1)))(x, w)
  f = jax.value_and_grad(loss(conv_of(backend)), (0, 1))
  got = jax.jit(f)(x, w)
  # Same arithmetic in another order: float32 reassociation only.
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
  negative = any(p < 0 for pair in padding for p in pair) if not isinstance(padding, str) else 0
  # Which path ran: oneDNN for everything but the cropping padding, which it cannot do.
  native = backend == 'native' and not negative
  assert custom_calls(f, x, w) == (
      {'cvjax_CvjaxConvForward', 'cvjax_CvjaxConvBackward'} if native else set())


def test_other_convolutions_go_to_lax_unchanged(backend):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)
  for kw in (dict(rhs_dilation=(2, 2)), dict(batch_group_count=2)):
    wk = w[..., :2] if 'batch_group_count' in kw else w
    f = lambda conv: jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), 'SAME',
                                                       dimension_numbers=DIMS, **kw) ** 2))(wk)
    np.testing.assert_array_equal(f(conv_of(backend)), f(lax.conv_general_dilated))
  # bfloat16 goes to oneDNN only where it has bfloat16 kernels (avx512_bf16, AMX).
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  conv = lambda x, w: conv_of(backend)(x, w, (1, 1), 'SAME', dimension_numbers=DIMS)
  assert bool(custom_calls(conv, xb, wb)) == (backend == 'native' and onednn.bf16())


def test_gradients_inside_a_scan_match(backend):
  # The case the explicit form exists for: a convolution in a loop body.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 8)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 8)) * 0.2, jnp.float32)

  def loss(conv):
    def body(h, w):
      return jnp.tanh(conv(h, w, (1, 1), 'SAME', dimension_numbers=DIMS)), None
    return lambda ws: jnp.sum(lax.scan(body, x, ws)[0] ** 2)

  want = jax.jit(jax.grad(loss(lax.conv_general_dilated)))(ws)
  got = jax.jit(jax.grad(loss(conv_of(backend))))(ws)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_donated_jit_matches(backend):
  # Under jit with the input buffers donated (as the train step donates its state).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.2, jnp.float32)

  def step(conv, x, w):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DIMS),
                     x, w)
    dx, dw = vjp(jnp.cos(y))
    return x - 0.1 * dx, w - 0.1 * dw

  want = jax.jit(functools.partial(step, lax.conv_general_dilated))(x, w)
  got = jax.jit(functools.partial(step, conv_of(backend)),
                donate_argnums=(0, 1))(x.copy(), w.copy())
  for a, b in zip(want, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def require_bf16():
  require_native()
  if not onednn.bf16():
    pytest.skip(f'oneDNN has no bfloat16 kernels on this CPU ({onednn.bf16_kernel()})')


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((4, 16, 16, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),  # CIFAR ResNet 3x3
    ((4, 16, 16, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # stride-2 first block
    ((4, 16, 16, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1))),    # stem
    ((4, 12, 12, 1), (5, 5, 1, 6), (1, 1), ((0, 0), (0, 0))),     # LeNet C1
    ((4, 8, 8, 4), (5, 5, 2, 6), (1, 1), ((2, 2), (2, 2))),       # two groups
])
def test_bfloat16_kernels_round_only_their_outputs(shape, kernel, strides, padding):
  # The bfloat16 convolution, its input gradient and its weight gradient against float32
  # arithmetic on the same bfloat16 inputs (x, w, dy exactly representable): oneDNN
  # accumulates in float32, so each output may differ by its own rounding to bfloat16 (half
  # an ulp: 2^-9 relative) plus float32 reassociation. Bound: 2^-8 relative to the element
  # plus 1e-3 of the largest; bfloat16 accumulation would miss it by far (sums of 9-144 terms).
  require_bf16()
  rng = np.random.default_rng(5)
  groups = shape[-1] // kernel[2]
  bf = lambda a: jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)
  x, w = bf(rng.normal(size=shape)), bf(rng.normal(size=kernel))
  conv = lambda c: lambda x, w: c(x, w, strides, padding, dimension_numbers=DIMS,
                                  feature_group_count=groups)
  y, vjp = jax.vjp(conv(NATIVE), x, w)
  dy = bf(rng.normal(size=y.shape))
  got = (y, *vjp(dy))
  f32 = lambda a: a.astype(jnp.float32)
  y32, vjp32 = jax.vjp(conv(lax.conv_general_dilated), f32(x), f32(w))
  want = (y32, *vjp32(f32(dy)))
  for name, g, r in zip(('y', 'dx', 'dw'), got, want):
    assert g.dtype == jnp.bfloat16, name
    g, r = np.asarray(f32(g)), np.asarray(r)
    bound = 2.0 ** -8 * np.abs(r) + 1e-3 * np.abs(r).max()
    assert np.all(np.abs(g - r) <= bound), (name, float(np.max(np.abs(g - r) - bound)))
  f = jax.grad(lambda x, w: jnp.sum(f32(conv(NATIVE)(x, w)) ** 2), (0, 1))
  assert custom_calls(f, x, w) == {'cvjax_CvjaxConvForward', 'cvjax_CvjaxConvBackward'}


def test_weight_gradient_alone_skips_the_input_gradient():
  # The stem's case: its input (the image) is not differentiated, so the backward call is
  # told not to compute the input gradient; the weight gradient is unchanged.
  require_native()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)
  grad = lambda conv: jax.grad(lambda w: jnp.sum(jnp.sin(
      conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS))))
  want = jax.jit(grad(lax.conv_general_dilated))(w)
  np.testing.assert_allclose(jax.jit(grad(NATIVE))(w), want,
                             rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
  assert 'need_dx = 0' in jax.jit(grad(NATIVE)).lower(w).as_text()


def test_bad_shapes_raise_instead_of_crashing():
  # Shapes the Python side would never send: the handler answers with an error.
  require_native()
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  call = jax.ffi.ffi_call('cvjax_CvjaxConvForward', jax.ShapeDtypeStruct((2, 5, 5, 4), x.dtype))
  attrs = {k: np.int64(v) for k, v in dict(stride_h=1, stride_w=1, pad_top=1, pad_bottom=1,
                                             pad_left=1, pad_right=1, groups=1).items()}
  with pytest.raises(Exception, match='cvjax onednn conv'):
    jax.block_until_ready(call(x, w, **attrs))  # Output 5x5 for an 8x8 SAME convolution.
  with pytest.raises(Exception, match='cvjax onednn conv'):
    jax.block_until_ready(call(x, w, **{**attrs, 'groups': np.int64(3)}))


@pytest.mark.slow
def test_cifar_resnet_convolutions_take_the_explicit_gradients(monkeypatch):
  # Every convolution of the CIFAR ResNet goes through conv2d (stem + 2 per block).
  calls = []
  original = convolution.conv2d

  def spy(*args):
    calls.append(args[2:])
    return original(*args)

  monkeypatch.setattr(convolution, 'conv2d', spy)
  from cvjax.models import CifarResNet  # pylint: disable=g-import-not-at-top
  model = CifarResNet(depth=8)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  jax.grad(lambda p: jnp.sum(model.apply({**variables, 'params': p}, x)))(variables['params'])
  assert len(calls) == 2 * 7  # init and apply, 7 convolutions each
  assert ((2, 2), ((1, 1), (1, 1))) in calls  # the stride-2 first block of a stage: pad 1


@pytest.mark.slow
@pytest.mark.parametrize('scan_blocks', [False, True])
def test_train_steps_match_on_both_paths(idx_dir, tmp_path, scan_blocks):
  # ResNet-14 with BatchNorm, split forward/backward programs, blocks unrolled or scanned
  # (nn.scan, ResNet-1202's default): one SGD step on oneDNN gives the train state (parameters,
  # statistics, momentum) of one step on XLA's convolutions from the same state, at the start
  # and after a oneDNN step (momentum and BatchNorm statistics no longer at their initial
  # values). Tolerance: float reassociation only. (Before the scratchpads
  # were the caller's, the scanned net ended up to 50% apart.) Steps are compared one at a
  # time: over several steps this tiny net amplifies rounding. On jax 0.12, XLA's own steps
  # 3-6 took two step-2 states 4e-7 apart to 0.013 apart, so a 6-step comparison measured that
  # amplification, not the kernels.
  require_native()
  import shutil  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from cvjax import train  # pylint: disable=g-import-not-at-top

  def run(native, steps, workdir):
    config = tiny_config(idx_dir, **{
        'model.depth': 14, 'model.scan_blocks': scan_blocks, 'train.native_conv': native,
        'schedule.name': 'constant', 'train.num_steps': steps, 'train.eval_every_steps': 100,
        'train.checkpoint_every_steps': 1})
    state, _ = train.train_and_evaluate(config, str(workdir))
    return jax.device_get(state)

  def assert_close(a, b):
    assert int(a.step) == int(b.step)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)

  native = tmp_path / 'native'
  assert_close(run(True, 1, native), run(False, 1, tmp_path / 'xla'))  # From the start.
  shutil.copytree(native, tmp_path / 'from1_False')  # From oneDNN's state at step 1.
  assert_close(run(True, 2, native), run(False, 2, tmp_path / 'from1_False'))


# Stress: many custom calls of one program at once, and several threads at once. XLA:CPU
# runs independent custom calls on whichever of its threads is free; a oneDNN primitive
# built on one thread and executed on another once worked in the executing thread's
# library-owned scratchpad, sized for other primitives: 15-25 of 40 calls of this program
# returned wrong gradients (AMD Zen 5, before the fix), AVX2 kernels crashed or hung.
STRESS_SHAPES = [(8, 16, 16, 16, 16), (8, 16, 16, 16, 32), (8, 8, 8, 32, 32),
                 (8, 16, 16, 3, 16)] * 4  # (n, h, w, c, o): 16 independent convolutions.


def stress_program(conv):
  def loss(xs, ws):
    return sum(jnp.sum(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS)
                       .astype(jnp.float32) ** 2) for x, w in zip(xs, ws))
  return jax.jit(jax.grad(loss, (0, 1)))


def stress_inputs(seed=0, dtype=jnp.float32):
  """Inputs in `dtype`; for bfloat16 the float32 reference gets the same (rounded) values."""
  rng = np.random.default_rng(seed)
  xs = [jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32).astype(dtype)
        for n, h, w, c, _ in STRESS_SHAPES]
  ws = [(jnp.asarray(rng.standard_normal((3, 3, c, o)) * 0.1, jnp.float32)).astype(dtype)
        for _, _, _, c, o in STRESS_SHAPES]
  return xs, ws


def check_calls(results, reference):
  """Every call equals XLA's float32 convolutions (float32 tolerance; for bfloat16 results,
  a few bfloat16 roundings: 2e-2 of the largest) and the first call (bit for bit)."""
  first = jax.device_get(results[0])
  for i, got in enumerate(results):
    got = jax.device_get(got)
    for g, f, r in zip(jax.tree.leaves(got), jax.tree.leaves(first), jax.tree.leaves(reference)):
      tol = 2e-2 if g.dtype == jnp.bfloat16 else 1e-4
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=tol,
                                 atol=tol * float(np.abs(r).max()),
                                 err_msg=f'call {i} differs from XLA\'s convolutions')
      np.testing.assert_array_equal(g, f, err_msg=f'call {i} differs from call 0')


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def overlapping_calls(dtype='float32'):
  """One program of 16 independent convolutions, called 40 times."""
  xs, ws = stress_inputs(dtype=jnp.dtype(dtype))
  reference = jax.device_get(stress_program(lax.conv_general_dilated)(_f32(xs), _f32(ws)))
  native = stress_program(NATIVE)
  check_calls([native(xs, ws) for _ in range(40)], reference)


def threads_at_once(dtype='float32'):
  """Four Python threads call two different programs at once: XLA's threads then run custom
  calls of several programs at the same time."""
  inputs = [stress_inputs(seed, jnp.dtype(dtype)) for seed in (1, 2)]
  strided = lambda conv: jax.jit(jax.grad(lambda xs, ws: sum(
      jnp.sum(jnp.tanh(conv(x, w, (2, 2), 'SAME', dimension_numbers=DIMS).astype(jnp.float32)))
      for x, w in zip(xs, ws)), (0, 1)))
  programs = [stress_program(NATIVE), strided(NATIVE)]
  references = [stress_program(lax.conv_general_dilated)(*_f32(inputs[0])),
                strided(lax.conv_general_dilated)(*_f32(inputs[1]))]
  results = {k: [] for k in range(4)}

  def work(k):
    for _ in range(10):
      results[k].append(jax.block_until_ready(programs[k % 2](*inputs[k % 2])))
  threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for k in (0, 1):
    check_calls(results[k] + results[k + 2], jax.device_get(references[k]))


@pytest.mark.slow  # A stress program in a child process per instruction set: ~10 s each.
@pytest.mark.parametrize('isa,dtype', [('this CPU', 'float32'), ('AVX2', 'float32'),
                                       ('AVX512_CORE', 'float32'), ('this CPU', 'bfloat16')])
def test_overlapping_calls_and_threads_give_the_same_bits(isa, dtype):
  # In a child process, so that a crash or a hang fails this test instead of the suite.
  # oneDNN picks its kernels by instruction set and the AVX2 ones (AMD Zen 3) need other
  # scratchpads than the AVX-512 ones: ONEDNN_MAX_CPU_ISA makes this machine run them.
  # bfloat16: its own kernels (and scratchpads), where the CPU has them.
  require_bf16() if dtype == 'bfloat16' else require_native()
  env = child_env() if isa == 'this CPU' else child_env(ONEDNN_MAX_CPU_ISA=isa)
  script = (f'import test_convolution as t\nt.overlapping_calls({dtype!r})\n'
            f't.threads_at_once({dtype!r})\nprint("SAME BITS")')
  try:
    out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=240)
  except subprocess.TimeoutExpired:
    pytest.fail(f'the stress program hung ({isa} kernels): no result in 240 s')
  assert out.returncode == 0 and 'SAME BITS' in out.stdout, (out.returncode, out.stderr[-3000:])
