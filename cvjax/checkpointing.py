"""Orbax checkpoints of the train state, tagged with what model they belong to."""

import os
import uuid

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from cvjax.errors import UserError


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
  """The latest saved state, or None; refuses a checkpoint of a different model.

  `abstract_state` holds ShapeDtypeStructs with shardings, so the arrays come back
  already placed where the train step wants them.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  saved = mngr.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))['identity']
  if saved != identity:
    diff = {k: (saved.get(k), identity.get(k)) for k in set(saved) | set(identity)
            if saved.get(k) != identity.get(k)}
    raise UserError(
        f'the workdir holds a checkpoint (step {step}) of a different model: '
        + '; '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in sorted(diff.items()))
        + f'. Use a new --workdir, or the config the checkpoint was made with. '
        f'Nothing in {mngr.directory} was changed.')
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state']


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
