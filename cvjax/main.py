"""Trains a model from a config file:

  python -m cvjax.main --config=configs/resnet.py --workdir=DIR [--config.x.y=value ...]

Re-running the same command on the same workdir resumes from its latest checkpoint.
Multi-process (one process per host or GPU): the same command on every process; see
cvjax/distributed.py for when it joins the others and the flags that say how.
"""

import logging as pylogging
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cvjax import distributed
from cvjax import train
from cvjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                                  'Join a multi-process run: auto, on or off (cvjax.distributed).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, where no cluster says it.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(pylogging.Filter):
  """Keeps the log to our progress lines: orbax logs every save step at INFO."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    logging.error('%s', e)
    print(f'\ncvjax: error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing, with config errors (a bad config arg, a misspelt override) as
  one line instead of a traceback."""
  try:
    args = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # Config files load lazily: load (and fail) here.
    return args
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    text = str(e)
    if isinstance(e, AttributeError):  # A misspelt override; ml_collections suggests a field.
      m = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
      text = (f'unknown config field {m.group(2)!r}; did you mean {m.group(1)!r}?' if m
              else f'unknown config field: {text}')
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # A config file's own exception arrives wrapped with its traceback: keep its message.
    message = lines[-1] if any(l.startswith('Traceback') for l in lines) else ' '.join(lines)
    print(f'cvjax: error: {message}\nUsage: python -m cvjax.main '
          '--config=configs/FILE.py[:arg] --workdir=DIR [--config.field=value ...]',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
