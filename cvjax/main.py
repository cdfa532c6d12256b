"""Trains a model from a config file:

  python -m cvjax.main --config=configs/resnet.py --workdir=DIR [--config.x.y=value ...]

  python -m cvjax.main --config=configs/lenet.py:quick --help     # the config's fields
  python -m cvjax.main --config=configs/lenet.py:quick --workdir=DIR --dry_run   # the plan

Re-running the same command on the same workdir resumes from its latest checkpoint.
Multi-process (one process per host or GPU): the same command on every process; see
cvjax/cluster/distributed.py for when it joins the others and the flags that say how.
Exit status: 0 done; 2 bad input (one paragraph on stderr says what and where);
75 stopped by SIGTERM or SIGINT after saving a checkpoint: re-run the command to resume.
"""

import logging as pylogging
import os
import shlex
import signal
import sys
import traceback


def _stopped_outside_training(signum, frame):
  """SIGTERM/SIGINT before cvjax.preemption takes over (importing JAX, parsing flags: a few
  seconds) or after it let go: no step runs, so there is nothing to save."""
  del frame
  print(f'\ncvjax: stopped by {signal.Signals(signum).name} while no training step was running; '
        'nothing was lost. Re-run the same command to continue.', file=sys.stderr, flush=True)
  os._exit(75)  # pylint: disable=protected-access  # errors.PREEMPTED_EXIT_CODE.


if __name__ == '__main__':  # Before the slow imports below.
  for _s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_s, _stopped_outside_training)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cvjax import config_help
from cvjax import errors
from cvjax import preemption
from cvjax import runtime
from cvjax import train
from cvjax.cluster import distributed
from cvjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                  'Join a multi-process run: auto, on or off (cvjax.cluster.distributed).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, where no cluster says it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', distributed.JOIN_TIMEOUT,
    'Seconds a multi-process run waits for its coordinator and the other processes to join.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the resolved config and the plan of the run '
                             '(steps, epochs, images, what it writes), then exit without training.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(pylogging.Filter):
  """Keeps the log to our progress lines: orbax logs every save step at INFO, and a save that
  fails (a full disk) as pages of tracebacks from each of its threads, which asyncio repeats
  for every write; cvjax's own message then says what failed. Their first lines stay."""

  def filter(self, record):
    message = record.getMessage()
    if 'Task exception was never retrieved' in message and '/orbax/' in message:
      return False
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < pylogging.WARNING or record.exc_info:
      return False  # An exception that reaches cvjax is reported by cvjax.
    if '\n' in message:
      record.msg, record.args = message.strip().splitlines()[0][:300], ()
      record.exc_info = record.exc_text = record.stack_info = None
    return True




def main(argv):
  runtime.configure()  # XLA flags and the compilation cache, before JAX starts.
  if len(argv) > 1:
    print(f'cvjax: error: unexpected argument(s) {" ".join(argv[1:])}: every option is a flag '
          f'written --name=value.\n{USAGE}', file=sys.stderr)
    sys.exit(2)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DRY_RUN.value:
    try:
      spec = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), '')
      print(f'Fields of --config={spec} with the overrides:\n'
            f'{config_help.describe(_CONFIG.value, spec)}\n'
            f'{config_help.plan(_CONFIG.value, _WORKDIR.value)}')
    except UserError as e:
      print(f'cvjax: error: {e}', file=sys.stderr)
      sys.exit(2)
    return
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    pylogging.shutdown()  # Flush the log first, so the error is the last thing printed.
    print(f'\ncvjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  except preemption.Preempted as e:
    pylogging.shutdown()
    print(f'\ncvjax: {e} Re-run the same command to {"resume" if e.step else "start"}:\n'
          '  python -m cvjax.main '
          f'{shlex.join(sys.argv[1:])}', file=sys.stderr)
    sys.exit(errors.PREEMPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    message = errors.storage_error(e)
    if message is None:
      raise
    pylogging.shutdown()
    print(f'\ncvjax: error: {message}', file=sys.stderr)
    sys.exit(2)


def config_file_error(e, path):
  """One paragraph for a config file that failed to load: the file, the line, the error."""
  chain, x = [], e
  while x is not None:  # The config's own exception is wrapped by absl and ml_collections.
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in reversed(chain):
    if isinstance(x, SyntaxError) and x.filename and os.path.samefile(x.filename, path):
      return f'config file {path}, line {x.lineno}: SyntaxError: {x.msg}.'
    frames = [f for f in traceback.extract_tb(x.__traceback__)
              if os.path.exists(f.filename) and os.path.samefile(f.filename, path)]
    if frames:
      line = frames[-1].line or ''
      source = '' if line.startswith('raise') else f' ({line})'
      return f'config file {path}, line {frames[-1].lineno}{source}: {type(x).__name__}: {x}'
    if isinstance(x, AttributeError) and "attribute 'get_config'" in str(x):
      return (f'config file {path} has no get_config(); a config file defines '
              '`def get_config(arg=None)` returning an ml_collections.ConfigDict.')
  return None


USAGE = ('Usage: python -m cvjax.main --config=configs/FILE.py[:arg] --workdir=DIR '
         '[--config.field=value ...] [--dry_run]')


def load_config(spec):
  """get_config(arg) of `spec` = 'FILE.py[:arg]', as ml_collections' config flag loads it."""
  return config_help.load_config(spec)


def print_help(spec):
  """--help: how to run, the flags, and with --config the config's fields (exit status 0)."""
  print(__doc__.strip(), '\n', USAGE, '\n\nFlags:', sep='\n')
  for flag in (_CONFIG, _WORKDIR, _DRY_RUN, _DISTRIBUTED, _COORDINATOR, _NUM_PROCESSES,
               _PROCESS_ID, _DISTRIBUTED_TIMEOUT):
    print(f'  --{flag.name}: {flags.FLAGS[flag.name].help}')
  if not spec:
    print('\nWith --config=FILE.py[:arg], --help also lists that config\'s fields.')
    return
  try:
    config = load_config(spec)
  except Exception as e:  # pylint: disable=broad-except
    print(f'\ncvjax: error: cannot load --config={spec}: {type(e).__name__}: {e}',
          file=sys.stderr)
    sys.exit(2)
  print(f'\nFields of --config={spec} (override any with --config.FIELD=VALUE):')
  print(config_help.describe(config, spec))


def parse_flags(argv):
  """absl's flag parsing, with config errors (a bad config arg, a misspelt override) as
  one line instead of a traceback."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
  path = spec.partition(':')[0]
  if any(a in ('--help', '-h', '--helpshort', '--helpfull', '-?') for a in argv[1:]):
    print_help(spec)
    sys.exit(0)
  try:
    args = flags.FLAGS(argv)
    if not hasattr(_CONFIG.value, 'to_dict'):  # Config files load lazily: load (and fail) here.
      raise TypeError(not_a_config(path, _CONFIG.value))
    return args
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit) and not (os.path.isfile(path) and config_file_error(e, path)):
      raise  # Not the config file's own sys.exit().
    text = str(e)
    loaded = config_file_error(e, path) if os.path.isfile(path) else None
    if isinstance(e, SystemExit):
      text = f'config file {path} called sys.exit({e.code}) while it was loaded.'
    elif isinstance(e, flags.IllegalFlagValueError) and '--workdir' in text:
      text = 'pass --workdir=DIR, the folder the run writes to (and resumes from).'
    elif isinstance(e, flags.IllegalFlagValueError) and not spec and '--config' in text:
      text = 'pass --config=FILE.py[:arg], the config file of the run (e.g. configs/resnet.py).'
    elif (os.path.isfile(path) and '--config' in text
          and 'must have a value other than None' in text):
      text = not_a_config(path, None)
    elif loaded:
      text = loaded
    elif path and not os.path.exists(path):
      text = f'config file {path}: No such file or directory.'
    elif isinstance(e, (AttributeError, KeyError)):  # A misspelt override.
      text = unknown_field_message(spec, argv) or f'unknown config field: {text}'
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # A config file's own exception arrives wrapped with its traceback: keep its message.
    message = lines[-1] if any(l.startswith('Traceback') for l in lines) else ' '.join(lines)
    print(f'cvjax: error: {message}\n{USAGE}\n(--help with --config lists its fields.)',
          file=sys.stderr)
    sys.exit(2)


def not_a_config(path, value):
  got = 'None' if value is None else type(value).__name__
  return (f'config file {path}: get_config() returned {got}, expected an '
          'ml_collections.ConfigDict' + (' (is a `return c` missing?).' if value is None else '.'))


def unknown_field_message(spec, argv):
  """'unknown config field 'train.learning_rate'; did you mean 'optimizer.learning_rate'?',
  looking for the nearest field anywhere in the config; None if the config cannot say."""
  try:
    config = load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  if not hasattr(config, 'to_dict'):  # The override met no config at all.
    return not_a_config(spec.partition(':')[0], config)
  parts = []
  for name in config_help.unknown_fields(config, argv):
    near = config_help.nearest_field(config, name)
    parts.append(f'unknown config field {name!r}' + (f'; did you mean {near!r}?' if near
                                                     else ''))
  return '; '.join(parts) or None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
