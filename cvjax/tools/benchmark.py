"""Training and evaluation throughput of cvjax's train step, optionally beside PyTorch.

  python -m cvjax.tools.benchmark --model=resnet20 --batch_size=128 [--steps=N]
      [--dtype=float32|bfloat16, repeatable] [--baseline=torch] [--variants=one_program,split]
      [--recipe=none,label_smoothing,mixup_cutmix,random_erasing,ema,accumulate2,all]
      [--matmul_size=4096: the MFU roof's matmul; 512 for a quick run]
  python -m cvjax.tools.benchmark --model=resnet20,lenet5 --variants= --population=1,2,5,10 \
      [--steps_per_call=1,10]

Models: resnetN / plainN (CIFAR, 32x32x3), imagenet_resnetN / imagenet_plainN (224x224x3,
1000 classes; no PyTorch twin), lenet5 (32x32x1) and airbench (configs/speedrun.py, 32x32x3). For each model, dtype and
step variant it prints train images/s, step time (median, p90), compile time, first-step
time, eval images/s, achieved GFLOP/s, MFU against a matmul peak measured in the same
run and the fraction of the CPU's peak FLOP/s in the row's dtype (cvjax.tools.cpu_peak),
and the process's peak host memory so far (a high-water mark: run one model per
process to attribute it); the last line is one JSON object with every figure.
The step is the real one (`jit_steps.jit_train_step`: gather from a device-resident
dataset, augmentation, forward, backward, SGD update) on random images.

`--population=P,...` adds a table of the population step (`population.seeds=P`, one program
for P members, cvjax/population.py) and `--steps_per_call=K,...` of K steps per dispatch, on
the data that ship with cvjax (cifar10_6k for the CIFAR nets, mnist10k for LeNet-5): time
per step of the whole population, and per member-step against P single runs; its FLOPs are P
times a member's step (XLA's count of one run's step).
"""

import functools
import itertools
import json
import platform
import re
import resource
import time

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from cvjax import experiment
from cvjax import jit_steps
from cvjax import models
from cvjax import optim
from cvjax import runtime
from cvjax import sharding
from cvjax import steps
from cvjax import train
from cvjax.data import memory
from cvjax.ops import convolution
from cvjax.tools import cpu_peak

_MODEL = flags.DEFINE_list('model', ['resnet20'], 'resnetN, plainN (CIFAR) or lenet5.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Input height and width of the ImageNet '
                                   'ResNets (default 224; at least 64 keeps their 7x7 stem).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after the first.')
_DTYPE = flags.DEFINE_multi_enum('dtype', ['float32'], ['float32', 'bfloat16'],
                                 'Compute dtype(s): --dtype=float32 --dtype=bfloat16 runs both.')
_BASELINE = flags.DEFINE_enum('baseline', '', ['', 'torch'], 'Also run PyTorch eager.')
_REMAT = flags.DEFINE_bool('remat', None, 'train.remat: re-compute activations in backward '
                           '(default: the config\'s).')
_SCAN = flags.DEFINE_bool('scan_blocks', None, 'model.scan_blocks (default: the config\'s).')
_CONV = flags.DEFINE_list('conv', ['native', 'xla'],
                          'Convolution backends to time: native (oneDNN FFI calls, '
                          'train.native_conv=True) and/or xla (XLA\'s own).')
# The recipes of docs/recipes.md, one at a time, to time what each adds to the step.
RECIPES = {
    'none': {},
    'label_smoothing': {'train.label_smoothing': 0.1},
    'mixup_cutmix': {'input.mixup_alpha': 0.2, 'input.cutmix_alpha': 1.0},
    'random_erasing': {'input.random_erasing': 0.25},
    'ema': {'train.ema_decay': 0.999},
    'accumulate2': {'train.accumulate_steps': 2},
}
RECIPES['all'] = {k: v for r in RECIPES.values() for k, v in r.items()}
_RECIPE = flags.DEFINE_list('recipe', ['none'], 'Recipes to time the step with: '
                            + ', '.join(RECIPES) + ' (docs/recipes.md).')
_POPULATION = flags.DEFINE_list('population', [], 'Population sizes to time (e.g. 1,2,5,10).')
_PER_CALL = flags.DEFINE_list('steps_per_call', ['1'], 'Steps per dispatch for the population '
                              'table (e.g. 1,10).')
_MATMUL = flags.DEFINE_integer('matmul_size', 4096, 'Side of the square matmul whose speed is '
                               'the MFU roof (smaller: a quicker, rougher roof).')
_VARIANTS = flags.DEFINE_list('variants', ['one_program', 'split'],
                              'Step variants: one_program (forward+backward in one XLA '
                              'program), split (train.split_backward=True).')


def model_config(name):
  from configs import lenet, resnet, speedrun  # pylint: disable=g-import-not-at-top
  if name == 'lenet5':
    return lenet.get_config()
  if name == 'airbench':
    return speedrun.get_config()
  if re.fullmatch(r'(imagenet_)?(resnet|plain)\d+', name):
    return resnet.get_config(name)
  raise app.UsageError(f'unknown --model={name}; expected resnetN, plainN (CIFAR), '
                       'imagenet_resnetN, imagenet_plainN, lenet5 or airbench.')


def input_shape_and_classes(name):
  if name == 'lenet5':
    return (32, 32, 1), 10
  if name.startswith('imagenet_'):
    size = _IMAGE_SIZE.value or 224
    return (size, size, 3), 1000
  return (32, 32, 3), 10


def matmul_peak_gflops(dtype, n=4096, reps=5):
  """What XLA's own matmul reaches here: the roof MFU is measured against."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def run_jax(name, variant, batch_size, num_steps, warmup, dtype, conv='native', recipe='none'):
  config = model_config(name)
  for field, value in RECIPES[recipe].items():
    section, key = field.split('.')
    config[section][key] = value
  config.train.native_conv = conv == 'native'
  config.train.batch_size = batch_size
  config.train.compute_dtype = dtype
  config.train.split_backward = variant == 'split'
  if _REMAT.value is not None:
    config.train.remat = _REMAT.value
  if _SCAN.value is not None and 'scan_blocks' in config.model:
    config.model.scan_blocks = _SCAN.value
  shape, num_classes = input_shape_and_classes(name)
  dtype = convolution.compute_dtype(config)  # bfloat16 falls back to float32 without bf16 kernels.
  mesh = sharding.make_mesh(config)
  replicated = NamedSharding(mesh, P())
  model = models.create_model(config.model, num_classes=num_classes, dtype=dtype,
                              remat=config.train.get('remat', False),
                              conv_general_dilated=convolution.for_config(config))
  conv = 'native' if convolution.native_for(config) else 'xla'  # Label the row with what ran.
  tx = optim.make_optimizer(config.optimizer, optim.make_schedule(
      config.schedule, config.optimizer.learning_rate, 10_000), 10_000)
  ema = config.train.ema_decay > 0
  state = jax.jit(steps.state_initializer(model, tx, shape, dtype, ema),
                  out_shardings=replicated)(jax.random.key(0))
  rng = np.random.default_rng(0)
  n = 4 * batch_size
  data = jax.device_put({
      'train_images': rng.integers(0, 256, (n, *shape), np.uint8),
      'train_labels': rng.integers(0, num_classes, n).astype(np.int32),
      'mean': np.full((1, 1, 1, 1), 0.5, np.float32), 'std': np.ones((1, 1, 1, 1), np.float32)},
      replicated)
  batches = [{'indices': jax.device_put(np.arange(i * batch_size, (i + 1) * batch_size,
                                                 dtype=np.int32), NamedSharding(mesh, P('data')))}
             for i in range(4)]
  key = jax.random.key(1)

  train_batch = functools.partial(memory.train_batch, crop_padding=config.input.crop_padding,
                                  flip=config.input.flip)
  step = jit_steps.jit_train_step(model, tx, config, mesh, train_batch)
  t0 = time.perf_counter()
  state, _ = step(state, data, batches[0], key)
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  times = []
  for i in range(warmup + num_steps):
    t0 = time.perf_counter()
    state, metrics = step(state, data, batches[i % 4], key)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Init + training.

  test = dict(images=data['train_images'], labels=data['train_labels'],
              mask=jnp.ones(n, bool), mean=data['mean'], std=data['std'])
  eval_step = jax.jit(lambda s, t: steps.eval_step(
      s, t, {'index': 0}, model=model,
      make_eval_batch=functools.partial(memory.eval_batch, batch_size=n),
      batch_sharding=NamedSharding(mesh, P('data')), dtype=dtype),
                      compiler_options=jit_steps.program_options(config))
  jax.block_until_ready(eval_step(state, test))
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(eval_step(state, test))
  eval_ips = 3 * n / (time.perf_counter() - t0)
  flops = step_flops(config, tx, mesh, shape, num_classes, train_batch, (data, batches[0], key))
  return {'model': name, 'variant': variant, 'conv': conv, 'recipe': recipe,
          'computed_in': str(dtype),
          'train_images_per_s': batch_size / median,
          'step_ms_median': 1e3 * median, 'step_ms_p90': 1e3 * float(np.percentile(times, 90)),
          'compile_s': first - median, 'first_step_s': first, 'eval_images_per_s': eval_ips,
          **_flops_fields(flops, median), 'peak_host_memory_mib': peak_mib}


_MEMBER_FLOPS = {}  # (model, batch size) -> FLOPs of one run's step.


def run_population(name, members, per_call, batch_size, num_steps, warmup):
  """Step time of a population of `members` seeds, `per_call` steps per dispatch, through
  the training loop's own experiment and step (`experiment.build`,
  `jit_steps.compile_train_step`)."""
  config = model_config(name)
  config.dataset.name = 'mnist10k' if name == 'lenet5' else 'cifar10_6k'
  config.dataset.path = ''
  config.train.batch_size = batch_size
  config.train.num_steps = 10_000
  config.train.steps_per_call = per_call
  config.population.seeds = members
  exp = experiment.build(config)
  init_rng, rng = exp.rngs()
  state = steps.init_state(exp.init, init_rng, jit_steps.state_sharding(exp))
  data = jax.device_put(exp.input.train_data, NamedSharding(exp.mesh, P()))
  step = jit_steps.compile_train_step(exp, per_call)
  stream = exp.input.train_batches(0, train.data_seeds(exp))  # As the loop takes them.
  batches = [train.place_batch(exp, [next(stream) for _ in range(per_call)]) for _ in range(4)]
  t0 = time.perf_counter()
  state, _ = step(state, data, batches[0], rng)
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  calls = max(1, -(-num_steps // per_call))
  times = []
  for i in range(max(1, warmup // per_call) + calls):
    t0 = time.perf_counter()
    state, metrics = step(state, data, batches[i % 4], rng)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / per_call)
  median = float(np.median(times[-calls:]))
  split = per_call == 1 and steps.split_backward(config)
  if (name, batch_size) not in _MEMBER_FLOPS:  # A member's step, counted once per model.
    one = config.copy_and_resolve_references()
    one.population.seeds, one.train.steps_per_call = 1, 1
    indices = {'indices': jax.device_put(np.arange(batch_size, dtype=np.int32),
                                         NamedSharding(exp.mesh, P('data')))}
    _MEMBER_FLOPS[name, batch_size] = step_flops(
        one, exp.tx, exp.mesh, exp.input.image_shape, exp.input.num_classes,
        exp.input.make_train_batch, (data, indices, jax.random.key(1)))
  flops = _MEMBER_FLOPS[name, batch_size] and members * _MEMBER_FLOPS[name, batch_size]
  return {'model': name, 'members': members, 'steps_per_call': per_call,
          'dtype': config.train.compute_dtype,
          'variant': 'split' if split else 'one_program', 'step_ms_median': 1e3 * median,
          'member_step_ms': 1e3 * median / members,
          'train_images_per_s': members * batch_size / median, 'compile_s': first - median,
          **_flops_fields(flops, median),
          'peak_host_memory_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def print_population_table(results):
  print(f'{"model":<10} {"members":>7} {"per call":>8} {"variant":<12} {"step ms":>8} '
        f'{"ms/member":>9} {"vs P x 1":>8} {"img/s":>8} {"compile s":>9} {"peak MiB":>8}')
  for r in results:
    single = next((x['step_ms_median'] for x in results if x['model'] == r['model']
                   and x['members'] == 1 and x['steps_per_call'] == r['steps_per_call']), None)
    r['cost_vs_singles'] = (r['step_ms_median'] / (r['members'] * single)) if single else None
    ratio = f'{r["cost_vs_singles"]:.2f}' if single else '-'
    print(f'{r["model"]:<10} {r["members"]:>7} {r["steps_per_call"]:>8} {r["variant"]:<12} '
          f'{r["step_ms_median"]:>8.1f} {r["member_step_ms"]:>9.1f} {ratio:>8} '
          f'{r["train_images_per_s"]:>8.0f} {r["compile_s"]:>9.2f} '
          f'{r["peak_host_memory_mib"]:>8.0f}', flush=True)


def _flops_fields(flops, seconds):
  """GFLOP per step and GFLOP/s; None where the backend gave no FLOP count."""
  if not flops:
    return {'gflops_per_step': None, 'achieved_gflops_per_s': None}
  return {'gflops_per_step': flops / 1e9, 'achieved_gflops_per_s': flops / seconds / 1e9}


def step_flops(config, tx, mesh, shape, num_classes, make_train_batch, step_args):
  """Model FLOPs of one train step: XLA's cost analysis of the one-program step, without
  scan or micro-batches (the analysis counts a loop body once) or remat (re-computation is not
  model work). None where the backend has no cost analysis (some GPU and TPU plugins): the
  timings are still reported."""
  one = config.copy_and_resolve_references()
  one.train.split_backward = False
  one.train.native_conv = False  # XLA counts its own convolutions, not custom calls.
  one.train.remat = False
  one.train.accumulate_steps = 1  # The same model FLOPs; the analysis counts a scan body once.
  if 'scan_blocks' in one.model:
    one.model.scan_blocks = False
  dtype = jnp.dtype(one.train.compute_dtype)
  model = models.create_model(one.model, num_classes=num_classes, dtype=dtype,
                              conv_general_dilated=convolution.conv_general_dilated)
  state = jax.eval_shape(steps.state_initializer(model, tx, shape, dtype,
                                                 one.train.ema_decay > 0),
                         jax.random.key(0))
  lowered = jit_steps.jit_train_step(model, tx, one, mesh, make_train_batch).lower(
      state, *step_args)
  try:
    cost = lowered.cost_analysis()
    if cost is None:  # Backends without an unoptimised-HLO analysis: ask the compiled program.
      cost = lowered.compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  except Exception as e:  # pylint: disable=broad-except  # Unimplemented on this backend.
    print(f'  no FLOP count ({type(e).__name__}: {str(e)[:200]}); GFLOP/s and MFU left out.',
          flush=True)
    return None
  flops = (cost or {}).get('flops')
  if not flops:
    print('  no FLOP count from the cost analysis; GFLOP/s and MFU left out.', flush=True)
  return flops or None


def main(argv):
  runtime.configure()
  del argv
  # The roof for MFU: the faster of XLA's f32 matmul and its matmul in the compute dtype
  # (a bf16 step could always compute in f32; XLA:CPU's bf16 matmul can be far slower).
  rates = {d: matmul_peak_gflops(jnp.dtype(d), n=_MATMUL.value)
           for d in dict.fromkeys(['float32', *_DTYPE.value])}
  peaks = {d: max(rates['float32'], rates[d]) for d in _DTYPE.value}
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{platform.processor() or platform.machine()}; batch {_BATCH.value}; XLA matmul '
        + ', '.join(f'{d} {r:.0f} GFLOP/s' for d, r in rates.items()))
  cpu = cpu_peak.this_cpu() if jax.default_backend() == 'cpu' else None
  for d in dict.fromkeys(['float32', *_DTYPE.value]) if cpu else ():
    print(f'CPU peak, {d}: {cpu_peak.describe(cpu, d)}')
  results = []
  header = (f'{"model":<18} {"dtype":<8} {"variant":<12} {"conv":<6} {"recipe":<15} '
            f'{"img/s":>8} {"step ms":>8} '
            f'{"p90 ms":>8} {"compile s":>9} {"1st step s":>10} {"eval img/s":>10} '
            f'{"GFLOP/s":>8} {"MFU":>6} {"of peak":>7} {"peak MiB":>8}')
  print(header)
  for name in _MODEL.value:
    for dtype in dict.fromkeys(_DTYPE.value):
      for variant, conv, recipe in itertools.product(_VARIANTS.value, _CONV.value,
                                                     _RECIPE.value):
        if recipe not in RECIPES:
          raise app.UsageError(f'unknown --recipe={recipe}; expected {", ".join(RECIPES)}.')
        r = run_jax(name, variant, _BATCH.value, _STEPS.value, _WARMUP.value, dtype, conv, recipe)
        gflops = r['achieved_gflops_per_s']
        r.update(dtype=dtype, mfu=gflops / peaks[dtype] if gflops is not None else None)
        if cpu and gflops is not None:  # Against the peak of the dtype the row computed in.
          r['cpu_peak_gflops_per_s'] = cpu_peak.peak_gflops(cpu, r['computed_in'])
          r['fraction_of_cpu_peak'] = gflops / r['cpu_peak_gflops_per_s']
        of_peak = f'{r["fraction_of_cpu_peak"]:.1%}' if 'fraction_of_cpu_peak' in r else '-'
        results.append(r)
        print(f'{name:<18} {dtype:<8} {variant:<12} {conv:<6} {recipe:<15} '
              f'{r["train_images_per_s"]:>8.0f} '
              f'{r["step_ms_median"]:>8.1f} {r["step_ms_p90"]:>8.1f} {r["compile_s"]:>9.2f} '
              f'{r["first_step_s"]:>10.2f} {r["eval_images_per_s"]:>10.0f} '
              f'{_or_dash(r["achieved_gflops_per_s"], ">8.1f")} {_or_dash(r["mfu"], ">6.1%")} '
              f'{of_peak:>7} '
              f'{r["peak_host_memory_mib"]:>8.0f}', flush=True)
      if _BASELINE.value == 'torch' and (t := run_torch(name, dtype, results)):
        results.append(t)
  population = [run_population(name, int(p), int(k), _BATCH.value, _STEPS.value, _WARMUP.value)
                for name in _MODEL.value for k in _PER_CALL.value for p in _POPULATION.value]
  if population:
    print_population_table(population)
  print(json.dumps({'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
                    'devices': jax.device_count(), 'batch_size': _BATCH.value,
                    'matmul_gflops_per_s': rates, 'mfu_roof_gflops_per_s': peaks,
                    'cpu': cpu and {'kind': cpu_peak.kind(cpu), 'cores': cpu.cores,
                                    'mhz': cpu.mhz, 'mhz_source': cpu.mhz_source,
                                    'peak_gflops_per_s': {d: cpu_peak.peak_gflops(cpu, d)
                                                          for d in ('float32', 'bfloat16')}},
                    'results': results, 'population': population}))


def _or_dash(value, spec):
  return format(value, spec) if value is not None else format('-', spec[:2])


def run_torch(name, dtype, results):
  """PyTorch eager on the same net; prints the cvjax/PyTorch ratio of each cvjax row."""
  from cvjax.tools import torch_baseline  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if name.startswith('imagenet_plain'):
    print(f'  {name}: no PyTorch twin in cvjax.tools.torch_baseline; skipped.')
    return None
  cfg = model_config(name).model
  t = torch_baseline.benchmark(
      name, cfg.get('depth'), cfg.get('residual', True),
      input_shape_and_classes(name)[0], _BATCH.value, _STEPS.value,
      _WARMUP.value, dtype)
  t.update(model=name, dtype=dtype, variant=f'torch {torch.__version__} eager')
  print(f'{name:<18} {dtype:<8} {"torch eager":<12} {"torch":<6} {"none":<15} '
        f'{t["train_images_per_s"]:>8.0f} '
        f'{t["step_ms_median"]:>8.1f} {t["step_ms_p90"]:>8.1f} {"":>9} {"":>10} '
        f'{t["eval_images_per_s"]:>10.0f}')
  for r in results:
    if r['model'] == name and r['dtype'] == dtype and not r['variant'].startswith('torch'):
      r['ratio_vs_torch'] = r['train_images_per_s'] / t['train_images_per_s']
      print(f'  {name} {dtype} {r["variant"]} {r["conv"]}: {r["ratio_vs_torch"]:.2f}x PyTorch eager '
            '(train images/s)')
  return t


if __name__ == '__main__':
  app.run(main)
