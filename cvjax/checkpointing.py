"""Orbax checkpoints of the train state, tagged with what model they belong to."""

import os

import jax
import orbax.checkpoint as ocp

from cvjax.errors import UserError


def manager(workdir, keep):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


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
