"""Orbax checkpoints of the train state, tagged with what model and data they belong to;
restore falls back past checkpoints that fail to load."""

import os
import uuid

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from cvjax.errors import UserError


BAD_CHECKPOINTS = 'bad_checkpoints'  # In the workdir: checkpoints that failed to restore.


def directory(workdir):
  """WORKDIR/checkpoints: orbax writes gs:// (and any etils.epath path) natively."""
  return epath.Path(workdir if '://' in os.fspath(workdir) else os.path.abspath(workdir)) / \
      'checkpoints'


def manager(workdir, keep):
  return ocp.CheckpointManager(
      directory(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr, step, state, identity):
  """Saves asynchronously; `identity` (JSON) says which model the state belongs to."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          identity=ocp.args.JsonSave(identity)))


def restore_latest(mngr, abstract_state, identity):
  """The newest checkpoint that restores, or None; refuses a checkpoint of a different model.

  A step that fails to restore (a truncated or zeroed array file, garbage metadata, a
  missing item, nan/inf values) is moved to WORKDIR/bad_checkpoints/ with a warning that
  names the step and the error, and the next older one is tried: a re-run never stalls on
  a bad checkpoint, and the evidence is kept. `abstract_state` holds ShapeDtypeStructs with
  shardings, so the arrays come back already placed where the train step wants them.
  """
  restored = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved = mngr.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      set_aside(mngr, step, e)
      continue
    check_identity(saved['identity'], identity, step, mngr.directory)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
      if not jax.jit(all_finite)(restored):
        raise ValueError('the saved state holds nan or inf values')
      break
    except Exception as e:  # pylint: disable=broad-except
      restored = None
      set_aside(mngr, step, e)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('cvjax: bad checkpoints set aside')
  mngr.reload()
  return restored


def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_identity(saved, identity, step, directory):
  """Refuses a checkpoint whose identity differs in a field both record (checkpoints of
  older versions record fewer fields)."""
  diff = {k: (saved[k], identity[k]) for k in set(saved) & set(identity) if saved[k] != identity[k]}
  if diff:
    raise UserError(
        f'the workdir holds a checkpoint (step {step}) of a different model or dataset: '
        + '; '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in sorted(diff.items()))
        + f'. Use a new --workdir, or the config the checkpoint was made with. '
        f'Nothing in {directory} was changed.')


def _reason(e):
  """The first line of the error an exception was raised from: orbax wraps tensorstore's
  errors in pages of detail."""
  while e.__cause__:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [''])[0]
  return f'{type(e).__name__}: {text[:300]}'


def set_aside(mngr, step, error):
  """Moves an unrestorable checkpoint out of the manager's sight, to WORKDIR/bad_checkpoints."""
  checkpoints = epath.Path(mngr.directory)
  target = checkpoints.parent / BAD_CHECKPOINTS / str(step)
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
      n += 1
      target = checkpoints.parent / BAD_CHECKPOINTS / f'{step}-{n}'
    (checkpoints / str(step)).rename(target)
    (target / 'WHY.txt').write_text(f'step {step} could not be restored: {_reason(error)}\n')
  logging.warning('The checkpoint at step %d cannot be restored (%s); moved it to %s and '
                  'trying the one before.', step, _reason(error), target)


def abstract_with_sharding(tree, sharding):
  """ShapeDtypeStructs carrying `sharding` for every leaf (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


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
