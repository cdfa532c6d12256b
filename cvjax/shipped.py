"""Finished runs that ship with cvjax (trained/, docs/results): their final weights without the
optimizer state, and what reads them back.

A shipped run is an ordinary workdir (config.json, metrics.jsonl, TensorBoard events,
results.json, error_analysis/) whose checkpoints/ gave way to two files written by
`python -m cvjax.tools.ship`:

  weights.msgpack   the parameters and BatchNorm statistics (and their moving average, if the
                    run kept one) at the final step: flax.serialization's msgpack, one file
  weights.json      what they belong to: the model's fingerprint (as a checkpoint records it,
                    less the training data's label hash), the step, the class names in index
                    order, and the msgpack's sha256
  normalization.npz the input statistics the run trained with (`mean`, `std`, from its training
                    split), so that an evaluation on another copy of the data (a subset, or
                    lossless images where the run trained on JPEGs) feeds the net what it saw

`cvjax.evaluate` reads them on anyone's copy of the test set: the classes must be the same,
in the same order; the training split's order and the data's path do not matter. A shipped
run cannot be resumed: it has no optimizer state (cvjax.train refuses it)."""

import hashlib
import json

from etils import epath

from cvjax.errors import UserError

WEIGHTS = 'weights.msgpack'
META = 'weights.json'
NORMALIZATION = 'normalization.npz'


def is_shipped(workdir):
  return (epath.Path(workdir) / WEIGHTS).exists()


def weights_of(state):
  """The parts of a train state that a shipped run keeps."""
  out = {'params': state.params, 'model_state': state.model_state}
  if state.ema is not None:
    out['ema'] = state.ema
  return out


def write(workdir, state, fingerprint, class_names):
  """Writes weights.msgpack and weights.json for `state` (a single run's, on the host)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  data = flax.serialization.to_bytes(jax.device_get(weights_of(state)))
  run_dir = epath.Path(workdir)
  (run_dir / WEIGHTS).write_bytes(data)
  meta = {'step': int(jax.device_get(state.step)),
          'fingerprint': {k: v for k, v in fingerprint.items() if k != 'dataset'},
          'class_names': list(class_names), 'sha256': hashlib.sha256(data).hexdigest()}
  (run_dir / META).write_text(json.dumps(meta, indent=1))
  return meta


def write_normalization(workdir, test_data):
  """Writes the input statistics of a run's data (its Input's `test_data` mean and std)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with (epath.Path(workdir) / NORMALIZATION).open('wb') as f:
    np.savez(f, mean=np.asarray(test_data['mean'], np.float32),
             std=np.asarray(test_data['std'], np.float32))


def normalize_as_trained(workdir, test_data):
  """Sets `test_data`'s mean and std (an Input's) to those the shipped run trained with; a run
  shipped without them keeps the statistics of the data it is evaluated on."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / NORMALIZATION
  if not path.exists():
    return
  try:
    with path.open('rb') as f, np.load(f) as stats:
      loaded = {k: stats[k] for k in ('mean', 'std')}
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{path} is not what cvjax.tools.ship writes ({str(e)[:200]}). Restore it '
                    'from the repository (git checkout).') from None
  for key, value in loaded.items():
    if value.shape != np.shape(test_data[key]):
      raise UserError(f'{path}: its {key} has shape {value.shape}, the data\'s '
                      f'{np.shape(test_data[key])}: not statistics of this input.')
    test_data[key] = value.astype(np.float32)


def read_meta(workdir):
  path = epath.Path(workdir) / META
  try:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not {'step', 'fingerprint', 'class_names',
                                          'sha256'} <= set(meta):
      raise ValueError('expected an object with step, fingerprint, class_names and sha256')
  except FileNotFoundError:
    raise UserError(f'{path} is missing: {workdir} has {WEIGHTS} without the file that says '
                    'what model it belongs to. Ship the run again (python -m cvjax.tools.ship).'
                    ) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not what cvjax.tools.ship writes ({str(e)[:200]}).') from None
  return meta


def restore(workdir, exp):
  """The train state of `exp` (cvjax.experiment, a single run) with the shipped weights in
  `workdir`, its optimizer state None (evaluation never reads it). Refuses weights of another
  model, input shape or class list, and a weights file that does not match its sha256."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  meta = read_meta(workdir)
  data = (epath.Path(workdir) / WEIGHTS).read_bytes()
  if hashlib.sha256(data).hexdigest() != meta['sha256']:
    raise UserError(f'{workdir}/{WEIGHTS} does not match the sha256 in {META}: the file is '
                    'damaged or was replaced. Restore it from the repository (git checkout).')
  want = {k: v for k, v in exp.fingerprint.items() if k in ('model', 'num_classes',
                                                              'input_shape')}
  diff = [f'{k} was {meta["fingerprint"].get(k)!r}, now {v!r}' for k, v in want.items()
          if meta['fingerprint'].get(k) != v]
  if diff:
    raise UserError(f'the weights in {workdir} belong to another model or input: '
                    + '; '.join(diff) + '. Evaluate them with the config.json beside them.')
  if list(exp.input.class_names) != meta['class_names']:
    raise UserError(f'the weights in {workdir} were trained on the classes '
                    f'{meta["class_names"]} (in that index order); this data has '
                    f'{list(exp.input.class_names)}. Pass the dataset they were trained on.')
  abstract = exp.abstract_state
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), weights_of(abstract))
  try:
    weights = flax.serialization.from_bytes(target, data)
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{workdir}/{WEIGHTS} does not fit the model of its config.json '
                    f'({str(e)[:200]}).') from None
  return abstract.replace(step=np.int32(meta['step']), params=weights['params'],
                          model_state=weights['model_state'], opt_state=None,
                          ema=weights.get('ema'))
