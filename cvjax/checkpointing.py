"""Orbax checkpoints of the train state, tagged with what model and data they belong to;
restore falls back past checkpoints that fail to load."""

import contextlib
import dataclasses
import uuid

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from cvjax import workdir as workdir_lib
from cvjax.errors import UserError


BAD_CHECKPOINTS = 'bad_checkpoints'  # In the workdir: checkpoints that failed to restore.


def directory(workdir):
  """WORKDIR/checkpoints: orbax writes gs:// (and any etils.epath path) natively."""
  return workdir_lib.as_path(workdir) / 'checkpoints'


_watched = []  # For each open `saves_finished` block, the managers made inside it.


def manager(workdir, keep):
  mngr = ocp.CheckpointManager(
      directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
  if _watched:
    _watched[-1].append(mngr)
  return mngr


@contextlib.contextmanager
def saves_finished():
  """However the block ends (a bad image, a full disk, an error), the checkpoints its
  managers are still writing asynchronously are finished first: none is left half-written
  (an N.orbax-checkpoint-tmp folder) and no orbax error follows the run's own message."""
  _watched.append([])
  try:
    yield
  except BaseException:
    for mngr in _watched[-1]:
      try:
        mngr.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('A checkpoint being written could not be finished (%s).', _reason(e))
    raise
  finally:
    _watched.pop()


def save(mngr, step, state, fingerprint):
  """Saves asynchronously; `fingerprint` (JSON) says which model the state belongs to (as
  the item `identity`, the name checkpoints have always given it)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved_fields(state)),
                                          identity=ocp.args.JsonSave(fingerprint)))


def saved_fields(state):
  """A dataclass train state (or a population's dict of them) as the dict of fields orbax
  writes of it, less the fields that are None: an optional field added later (TrainState.ema)
  leaves the checkpoints of the runs that do not use it as they were, so checkpoints written
  before it still restore."""
  if isinstance(state, dict):
    return {k: saved_fields(v) for k, v in state.items()}
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}


def _as_built(abstract, restored):
  """`restored` (as `saved_fields` wrote it) in the structure of `abstract`."""
  if isinstance(abstract, dict):
    return {k: _as_built(v, restored[k]) for k, v in abstract.items()}
  if dataclasses.is_dataclass(abstract):
    return dataclasses.replace(abstract, **restored)
  return restored


def restore_latest(mngr, abstract_state, fingerprint, read_only=False):
  """The newest checkpoint that restores, or None; refuses a checkpoint of a different run.

  A checkpoint that does not fit this config is refused before anything is read: its
  fingerprint (model, data, input shape) must match, and so must the layout of its train
  state (every array's path, shape and dtype; the optimizer's settings decide its state's
  layout). The UserError names the fields that differ and no file is moved. A checkpoint that
  fits but fails to restore (a truncated or zeroed array file, garbage metadata, a missing
  item, nan/inf values) is damaged: it is moved to WORKDIR/bad_checkpoints/ with a WHY.txt
  and a warning that names the step and the error, and the next older one is tried, so a
  re-run never stalls on a bad checkpoint and the evidence is kept. With `read_only`
  (cvjax.evaluate and other readers) a damaged checkpoint is only reported and skipped: readers
  never move a run's files. `abstract_state` holds ShapeDtypeStructs with shardings, so the
  arrays come back already placed where the train step wants them.
  """
  restored = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved = mngr.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))
      saved_fingerprint = saved['identity']
      if not isinstance(saved_fingerprint, dict):
        raise ValueError(f'the fingerprint is a {type(saved_fingerprint).__name__}, not a dict')
      saved_layout = layout(ocp.StandardCheckpointHandler().metadata(
          epath.Path(mngr.directory) / str(step) / 'state'))
    except Exception as e:  # pylint: disable=broad-except
      set_aside(mngr, step, e, read_only)
      continue
    if not read_only:  # An evaluation reads the weights, whatever seed made them.
      check_seed(saved_fingerprint, fingerprint, step, mngr.directory)
    check_fingerprint(saved_fingerprint, fingerprint, step, mngr.directory)
    check_layout(saved_layout, layout(abstract_state), saved_fingerprint, fingerprint, step,
                 mngr.directory)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(saved_fields(abstract_state))))['state']
      restored = _as_built(abstract_state, restored)
      if not jax.jit(all_finite)(restored):
        raise ValueError('the saved state holds nan or inf values')
    except Exception as e:  # pylint: disable=broad-except
      restored = None
      set_aside(mngr, step, e, read_only)
      continue
    changed = _differences(saved_fingerprint.get('training'), fingerprint.get('training'))
    if changed:
      logging.warning('Resuming the checkpoint at step %d with changed settings: %s.', step,
                      '; '.join(changed))
    break
  if jax.process_count() > 1 and not read_only:
    multihost_utils.sync_global_devices('cvjax: bad checkpoints set aside')
  mngr.reload()
  return restored


def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# What may change between a checkpoint and the run that resumes it: the fields under
# fingerprint['training'] (the optimizer's and the schedule's settings, the length of the run),
# as long as the train state keeps its layout. A warning lists what changed.
RESUMABLE = 'training'


def check_seed(saved, fingerprint, step, directory):
  """Refuses to resume a checkpoint with another `seed` (a run's or a population's base
  seed): the steps before it drew their initialisation and data order from the old one, and
  config.json would then claim the new seed for them."""
  if 'seed' in saved and 'seed' in fingerprint and saved['seed'] != fingerprint['seed']:
    raise UserError(
        f'the checkpoint at step {step} was trained with seed={saved["seed"]}; this run asks '
        f'for seed={fingerprint["seed"]}. A seed decides the initialisation and the data order '
        f'of every step, so it cannot change within a run: resume with seed={saved["seed"]} '
        '(leave --config.seed out), or train the new seed as a fresh run in a new --workdir. '
        f'Nothing in {directory} was changed.')


def check_fingerprint(saved, fingerprint, step, directory):
  """Refuses a checkpoint whose fingerprint differs in a field both record (checkpoints of
  older versions record fewer fields), other than the resumable settings and the seed
  (`check_seed`)."""
  diff = {k: (saved[k], fingerprint[k])
          for k in set(saved) & set(fingerprint) - {RESUMABLE, 'seed'}
          if saved[k] != fingerprint[k]}
  if diff:
    raise UserError(
        f'the workdir holds a checkpoint (step {step}) of a different model or dataset: '
        + '; '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in sorted(diff.items()))
        + f'. Use a new --workdir, or the config the checkpoint was made with. '
        f'Nothing in {directory} was changed.')


def _key(k):
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def layout(tree):
  """{'path/to/array': 'shape dtype'} of every array in a train state, or in orbax's metadata
  of a saved one (the same paths: namedtuples are saved as dicts, tuples as lists)."""
  return {'/'.join(_key(k) for k in path): f'{tuple(x.shape)} {np.dtype(x.dtype).name}'
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(saved, now, prefix=''):
  """'field was A, now B' for every leaf of two nested dicts that differs."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [d for k in sorted(set(saved) | set(now), key=str)
            for d in _differences(saved.get(k), now.get(k), f'{prefix}{k}.')]
  return [] if saved == now else [f'{prefix[:-1]} was {saved!r}, now {now!r}']


def check_layout(saved, now, saved_fingerprint, fingerprint, step, directory):
  """Refuses a checkpoint whose train state has other arrays than this config builds, naming
  the settings that differ: restoring it would fail, and that is not damage."""
  if saved == now:
    return
  only_saved = sorted(set(saved) - set(now))
  only_now = sorted(set(now) - set(saved))
  reshaped = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
  what = []
  for name, keys in (('saved, not built by this config', only_saved),
                     ('built by this config, not saved', only_now),
                     ('of another shape or dtype', reshaped)):
    if keys:
      what.append(f'{name}: {", ".join(keys[:3])}' + (f' and {len(keys) - 3} more'
                                                     if len(keys) > 3 else ''))
  changed = _differences(saved_fingerprint.get(RESUMABLE), fingerprint.get(RESUMABLE))
  raise UserError(
      f'the checkpoint at step {step} does not fit this config'
      + (f' ({"; ".join(changed)})' if changed else '')
      + f': its train state has other arrays ({"; ".join(what)}). The optimizer\'s structure '
      'cannot change within a run (optimizer.name, momentum to or from 0, train.ema_decay to or '
      'from 0); the learning rate, '
      'schedule, weight decay, a non-zero momentum and the number of steps can. Use a new '
      f'--workdir, or the config the checkpoint was made with. Nothing in {directory} was '
      'changed.')


def _reason(e):
  """The first line of the error an exception was raised from: orbax wraps tensorstore's
  errors in pages of detail."""
  while e.__cause__:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {text[:300]}'


def set_aside(mngr, step, error, read_only=False):
  """Moves an unrestorable checkpoint out of the manager's sight, to WORKDIR/bad_checkpoints;
  `read_only`: only says so."""
  checkpoints = epath.Path(mngr.directory)
  if read_only:
    logging.warning('The checkpoint at step %d cannot be restored (%s); left it as it is and '
                    'trying the one before.', step, _reason(error))
    return
  target = checkpoints.parent / BAD_CHECKPOINTS / str(step)
  if target.parent.exists() and not target.parent.is_dir():
    raise UserError(f'the checkpoint at step {step} cannot be restored ({_reason(error)}), and '
                    f'{target.parent}, where damaged checkpoints are kept, is not a folder: '
                    'remove or rename that file and re-run.')
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
      n += 1
      target = checkpoints.parent / BAD_CHECKPOINTS / f'{step}-{n}'
    (checkpoints / str(step)).rename(target)
    (target / 'WHY.txt').write_text(
        f'step {step} could not be restored: {_reason(error)}\n'
        'It fitted the run (model, data, and the layout of every array in the train state), so '
        'the failure was its own: damaged or incomplete files. The run went on from the next '
        f'older checkpoint. To try this one again, move this folder back to checkpoints/{step}.\n')
  logging.warning('The checkpoint at step %d cannot be restored (%s); moved it to %s and '
                  'trying the one before.', step, _reason(error), target)


def abstract_with_sharding(tree, sharding):
  """ShapeDtypeStructs carrying `sharding` (one for all leaves, or a tree of them, as
  cvjax.sharding.state_sharding gives) for every leaf: the restore target."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      sharding)


def check_shared_workdir(workdir):
  """In a multi-process run, every process must see the same workdir: each writes its own
  part of every checkpoint there, and a restore reads all parts. A host-local path on a pod
  gives each host a different folder; say so before anything is written or restored."""
  if jax.process_count() == 1:
    return
  token = str(multihost_utils.broadcast_one_to_all(np.frombuffer(
      uuid.uuid4().bytes, np.uint8)).tobytes().hex())
  marker = epath.Path(workdir) / f'.shared-check-{token}'
  if jax.process_index() == 0:
    marker.write_text(token)
  multihost_utils.sync_global_devices('cvjax: shared-workdir marker written')
  seen = marker.exists()
  everyone = multihost_utils.process_allgather(np.array(seen))
  multihost_utils.sync_global_devices('cvjax: shared-workdir marker read')
  if jax.process_index() == 0:
    marker.unlink()
  if not np.all(everyone):
    missing = [int(i) for i in np.flatnonzero(~np.asarray(everyone))]
    raise UserError(
        f'--workdir={workdir} is not shared between the {jax.process_count()} processes: '
        f'process(es) {missing} do not see what process 0 wrote there, so checkpoints would be '
        'split across hosts and could not be restored. Use a path every host sees: a bucket '
        '(gs://...) or a shared file system.')
