"""How a run ends when it does not simply finish: the exception that reaches the user as a
message, not a traceback, and the exit statuses `cvjax.main` gives."""

import errno
import os
import re
import signal
import sys

# EX_TEMPFAIL of sysexits.h ("try again later"): stopped by SIGTERM/SIGINT after saving a
# checkpoint; re-running the same command resumes.
PREEMPTED_EXIT_CODE = 75


def exit_on_signals_until_work_starts(what='nothing was written yet'):
  """SIGTERM/SIGINT while a command starts (its imports, its flags, its config file) end it at
  once with one line and exit 75, not a KeyboardInterrupt traceback; the returned function
  gives the signals back to Python's defaults where the command's own work begins."""
  def stopped(signum, frame):
    del frame
    print(f'\ncvjax: stopped by {signal.Signals(signum).name} while starting; {what}. Re-run '
          'the same command to continue.', file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, stopped)

  def restore():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
  return restore


class UserError(Exception):
  """Bad input from the user: a config value, a dataset, a workdir.

  `cvjax.main` prints the message as one paragraph and exits non-zero; the
  message must say what was wrong and what was expected.
  """


def storage_error(e):
  """One paragraph for a failed write (a full disk, a quota, a read-only file system) in
  `e`'s chain, else None. orbax reports these as ValueError('RESOURCE_EXHAUSTED: ...')."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    errno_ = getattr(e, 'errno', None)
    if errno_ in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or any(
        m in text for m in ('RESOURCE_EXHAUSTED', 'No space left', 'Disk quota exceeded',
                            'Read-only file system')):
      step = re.search(r'"([^"]*)/(\d+)\.orbax-checkpoint-tmp', text)
      path = re.search(r'local file "([^"]+)"', text)
      where = (f'the checkpoint at step {step[2]} to {step[1]}' if step else
               path[1] if path else getattr(e, 'filename', None))
      why = os.strerror(errno_) if errno_ else (
          'no space left on the device' if 'RESOURCE_EXHAUSTED' in text or 'No space' in text
          else text.splitlines()[0][:200])
      return (f'cannot write {where or "to the workdir"}: {why}. The checkpoints and logs '
              'written before are intact (a half-written checkpoint is ignored); free some '
              'space and re-run the same command to resume from the newest checkpoint.')
    e = e.__cause__ or e.__context__
  return None
