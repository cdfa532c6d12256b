"""What a train step costs on a (data, model) mesh: state and memory per device, collectives.

  python -m cvjax.tools.mesh_report --models=alexnet --meshes=1x1,1x2,4x2 --cpu_devices=8
  python -m cvjax.tools.mesh_report --models=vgg16 --meshes=8x1,4x2 --fsdp --cpu_devices=8

Models are cvjax.tools.summary's zoo names (`--models` and `--fsdp` are its flags) (full size, their input shapes). For each model,
mesh and FSDP setting the real train step (`jit_steps.jit_train_step`, one program, XLA's
convolutions) is lowered and compiled on abstract inputs: nothing is allocated unless
`--steps` runs it. Reported: the train state per device (cvjax.sharding's rules), XLA's memory
analysis of the compiled program per device (arguments, outputs, temporaries), and its
collectives (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all) from the
HLO. `--cpu_devices=N` simulates N CPU devices (they share the host's cores: step times are
then a lower bound on the cost, not a speed). XLA's convolutions, not oneDNN's: the oneDNN
custom calls are opaque to XLA's partitioner, which gathers their operands.
"""

import json
import time

from absl import app
from absl import flags
import jax

from cvjax.tools import summary

_MESHES = flags.DEFINE_list('meshes', ['1x1'], 'DATAxMODEL meshes, e.g. 1x1,1x2,4x2.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 0, 'Also run this many steps and time them (0: compile '
                              'only).')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Simulate this many CPU devices (0: the '
                                    'devices JAX finds).')


def report(name, data, model, fsdp, batch_size, num_steps=0):
  """One row: the mesh's state bytes, compiled memory and collectives per train step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from cvjax import jit_steps, models, optim, sharding, steps  # pylint: disable=g-import-not-at-top
  from cvjax.data import streaming  # pylint: disable=g-import-not-at-top
  from cvjax.ops import convolution  # pylint: disable=g-import-not-at-top
  cfg, shape, classes, _, _ = summary.ZOO[name]
  config = common.base_config()
  config.model = cfg
  config.mesh.model, config.mesh.fsdp = model, fsdp
  config.train.batch_size, config.train.split_backward = batch_size, False
  mesh = sharding.make_mesh(config, jax.devices()[:data * model])
  net = models.create_model(cfg, num_classes=classes, dtype=jnp.float32,
                            conv_general_dilated=sharding.grouped_per_device(
                                convolution.conv_general_dilated, mesh))
  tx = optim.make_optimizer(config.optimizer, lambda step: config.optimizer.learning_rate)
  init = steps.state_initializer(net, tx, shape, jnp.float32)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_sharding(abstract, mesh, config)
  by_data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  args = (
      jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                   shardings),
      {k: jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32, sharding=replicated)
       for k in ('mean', 'std')},
      {'images': jax.ShapeDtypeStruct((batch_size, *shape), jnp.uint8, sharding=by_data),
       'labels': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=by_data)},
      jax.random.key(0))
  step = jit_steps.jit_train_step(net, tx, config, mesh, streaming.train_batch, shardings)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  row = {'model': name, 'mesh': f'{data}x{model}', 'fsdp': fsdp, 'batch_size': batch_size,
         'compile_s': round(time.perf_counter() - t0, 1),
         'state_bytes': sharding.device_bytes(abstract, shardings),
         'collectives': sharding.count_collectives(compiled.as_text())}
  memory = compiled.memory_analysis()
  if memory is not None:
    row['memory_bytes'] = {k: getattr(memory, f'{k}_size_in_bytes')
                           for k in ('argument', 'output', 'temp', 'generated_code')}
  if num_steps:
    rng = np.random.default_rng(0)
    state = steps.init_state(init, jax.random.key(0), shardings)
    data_arrays = jax.device_put({'mean': np.zeros((1, 1, 1, 1), np.float32),
                                  'std': np.ones((1, 1, 1, 1), np.float32)}, replicated)
    batch = jax.device_put({'images': rng.integers(0, 256, (batch_size, *shape), np.uint8),
                            'labels': rng.integers(0, classes, batch_size).astype(np.int32)},
                           by_data)
    state, _ = compiled(state, data_arrays, batch, args[3])  # Warm-up.
    times = []
    for _ in range(num_steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, data_arrays, batch, args[3])
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    row['step_s'] = round(float(np.median(times)), 3)
  return row


def format_row(r):
  mib = lambda n: f'{n / 2 ** 20:.1f}'
  c = r['collectives']
  text = (f'{r["model"]:10s} {r["mesh"]:5s} fsdp={str(r["fsdp"]):5s} state/device '
          f'{mib(r["state_bytes"]["total"])} MiB (params {mib(r["state_bytes"]["params"])})')
  if 'memory_bytes' in r:
    m = r['memory_bytes']
    text += f'  compiled: args {mib(m["argument"])} temp {mib(m["temp"])} MiB'
  text += '  ' + ' '.join(f'{k} {v}' for k, v in c.items())
  return text + (f'  step {r["step_s"]} s' if 'step_s' in r else '')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)
  names = summary._MODELS.value or ['alexnet']  # pylint: disable=protected-access
  unknown = [n for n in names if n not in summary.ZOO]
  if unknown:
    raise app.UsageError(f'unknown models {unknown}; expected some of: {", ".join(summary.ZOO)}')
  meshes = [summary.parse_mesh(m) for m in _MESHES.value]
  if any(d * m > jax.device_count() for d, m in meshes):
    raise app.UsageError(f'--meshes={",".join(_MESHES.value)} needs more than the '
                         f'{jax.device_count()} devices here; --cpu_devices=N simulates N.')
  fsdp = summary._FSDP.value  # pylint: disable=protected-access
  print(f'jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}')
  rows = []
  for name in names:
    for data, model in meshes:
      rows.append(report(name, data, model, fsdp, _BATCH.value, _STEPS.value))
      print(format_row(rows[-1]), flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
