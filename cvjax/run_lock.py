"""One run per workdir: a lock file that names its holder.

Two runs on one workdir would interleave metrics.jsonl, write two event files and keep
more checkpoints than asked. The lock is `WORKDIR/lock` (JSON: host, pid, start time),
created atomically and removed when the run ends, however it ends short of SIGKILL. A
lock left by a killed process is stale: on the same host, a pid that no longer runs (or
now runs a process started at another time) is taken over, with a warning. A lock from
another host cannot be checked from here: the error says how to remove it.
"""

import contextlib
import errno
import json
import os
import socket
import time

from absl import logging
import jax

from cvjax import workdir as workdir_lib
from cvjax.errors import UserError

LOCK_FILE = 'lock'
# An unreadable lock younger than this is taken to be a run writing it right now (it writes
# within microseconds of creating it); older, it is torn: its writer died in between.
FRESH_SECONDS = 10


def _start_time(pid):
  """When `pid` started (clock ticks since boot; Linux), to tell a reused pid apart."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder):
  """Whether the process a lock names still runs (a lock of another host counts as alive)."""
  if holder.get('host') != socket.gethostname():
    return True
  pid = holder.get('pid')
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError):
    return True
  started = _start_time(pid)
  return started is None or holder.get('started') in (None, started)


def _read(path):
  try:
    with open(path) as f:
      holder = json.load(f)
  except (OSError, ValueError):
    return {}  # Torn (the writer was killed between create and write) or gone.
  return holder if isinstance(holder, dict) else {}


def _read_settled(path):
  """The holder a lock names, waiting while it is unreadable and fresh (a run creating it
  now); {} for a lock still unreadable at FRESH_SECONDS old, None when it is gone."""
  while True:
    holder = _read(path)
    if holder:
      return holder
    try:
      age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
      return None
    if age >= FRESH_SECONDS:
      return {}
    time.sleep(min(0.2, FRESH_SECONDS - age))


def _cannot_create(workdir, why):
  return UserError(f'cannot create --workdir={workdir}: {why}. Choose a folder this user can '
                   'write.')


def check_creatable(workdir):
  """Raises the UserError `acquire` would for a local `workdir` that cannot be created (a
  file on its path, a folder this user cannot write), before the minutes a run spends on its
  data and its compiled steps; writes nothing."""
  if workdir_lib.is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  if path == os.path.abspath(workdir) and os.path.isdir(path):
    return  # acquire checks its lock.
  if not os.path.isdir(path):
    raise _cannot_create(workdir, os.strerror(errno.ENOTDIR))
  if not os.access(path, os.W_OK | os.X_OK):
    raise _cannot_create(workdir, os.strerror(errno.EACCES))


def acquire(workdir):
  """Creates `workdir` and its lock; raises UserError when another live run holds it."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise _cannot_create(workdir, e.strerror or e) from e
  path = os.path.join(workdir, LOCK_FILE)
  if os.path.lexists(path) and not os.path.isfile(path):
    raise UserError(f'{path} is not a file (a folder or a link?): cvjax keeps its run lock '
                    'there. Remove or rename it and re-run.')
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _start_time(os.getpid()),
        'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(3):  # Tries to create it: a lock removed as stale may be re-created at once.
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_settled(path)
      if holder is None:  # Released meanwhile.
        continue
      if holder and _alive(holder):
        where = ('this host' if holder.get('host') == socket.gethostname()
                 else f'host {holder.get("host")!r}')
        raise UserError(
            f'--workdir={workdir} is in use by another run (pid {holder.get("pid")} on {where}, '
            f'since {holder.get("since")}). Two runs on one workdir would mix their logs and '
            'checkpoints: wait for it to end, or use another --workdir. If that run is dead '
            f'(e.g. its machine is gone), delete {path}.') from None
      logging.warning('Removing the stale lock of a run that no longer runs (%s): %s.',
                      holder or 'unreadable', path)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    except OSError as e:
      raise UserError(f'cannot write to --workdir={workdir}: {e.strerror or e}. Choose a '
                      'folder this user can write.') from e
    try:
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
    except OSError as e:  # A full disk: leave no empty lock behind.
      with contextlib.suppress(OSError):
        os.remove(path)
      raise UserError(f'cannot write to --workdir={workdir}: {e.strerror or e}. Free some space '
                      'or choose another folder.') from None
    return path
  raise UserError(f'could not take the lock {path}: another run keeps creating it.')


def release(path):
  """Removes the lock if it is still ours."""
  if _read(path).get('pid') == os.getpid():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def remove_if_held_by(workdir, pid):
  """Removes WORKDIR/lock when process `pid` of this host holds it (a trial that was killed:
  SIGKILL leaves its lock behind); returns whether it did."""
  path = os.path.join(workdir, LOCK_FILE)
  holder = _read(path)
  if holder.get('pid') != pid or holder.get('host') != socket.gethostname():
    return False
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)
  return True


@contextlib.contextmanager
def hold(workdir):
  """The lock for the duration of a run. In a multi-process run, process 0 holds it. A
  remote workdir (gs://...) has no atomic create-if-absent here: no lock there."""
  if jax.process_index() != 0 or workdir_lib.is_remote(workdir):
    yield
    return
  path = acquire(workdir)
  try:
    yield
  finally:
    release(path)
