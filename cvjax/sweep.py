"""Runs a sweep: each trial of an experiments/ file as its own `cvjax.main` run.

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py:quick \
      --workdir=runs/depth [--only=plain20,resnet20] [--dry_run] [--config.x.y=value ...]

A sweep file defines `get_trials(arg) -> [(name, {field: value})]`. Trial `name` trains in
WORKDIR/name with the base config, the `--config.*` overrides given here, then the trial's
own. A trial whose workdir holds results.json is finished and skipped; an interrupted one
resumes from its checkpoint. `--dry_run` prints the commands instead.
"""

import importlib.util
import os
import shlex
import signal
import subprocess
import sys

from absl import app
from absl import flags
from etils import epath

from cvjax import errors

_CONFIG = flags.DEFINE_string('config', None, 'Base config file[:arg].')
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file[:arg], e.g. experiments/x.py:quick.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: one subfolder per trial.')
_ONLY = flags.DEFINE_list('only', [], 'Run only these trials.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the trial commands, run nothing.')
# Passed on to every trial: how a multi-process trial joins its peers (cvjax.cluster.distributed).
_DISTRIBUTED = flags.DEFINE_string('distributed', None, 'auto, on or off.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in each trial.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')
flags.mark_flags_as_required(['config', 'sweep', 'workdir'])


def load_trials(spec):
  """`path[:arg]` -> [(name, overrides)]."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise app.UsageError(f'--sweep={spec}: {path} does not exist.')
  module_spec = importlib.util.spec_from_file_location('sweep', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  trials = module.get_trials(arg or None)
  names = [name for name, _ in trials]
  if len(set(names)) != len(names):
    raise ValueError(f'{path}: trial names must be unique, got {names}.')
  return trials


def format_value(value):
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def trial_command(config, workdir, name, overrides, extra=(), python=sys.executable):
  return [python, '-m', 'cvjax.main', f'--config={config}',
          f'--workdir={os.path.join(workdir, name)}', *extra,
          *(f'--config.{k}={format_value(v)}' for k, v in overrides.items())]


def is_finished(trial_dir):
  return (epath.Path(trial_dir) / 'results.json').exists()


def run_sweep(config, sweep, workdir, *, only=(), dry_run=False, extra=()):
  """Runs (or prints) the trials; returns {name: 'skipped'|'ran'|'failed'|'dry-run'}."""
  trials = load_trials(sweep)
  unknown = set(only) - {name for name, _ in trials}
  if unknown:
    raise app.UsageError(f'--only names unknown trials {sorted(unknown)}; the sweep has '
                         f'{[n for n, _ in trials]}.')
  status = {}
  for name, overrides in trials:
    if only and name not in only:
      continue
    cmd = trial_command(config, workdir, name, overrides, extra)
    if dry_run:
      print(shlex.join(cmd))
      status[name] = 'dry-run'
    elif is_finished(os.path.join(workdir, name)):
      print(f'[sweep] {name}: finished, skipped.', flush=True)
      status[name] = 'skipped'
    else:
      print(f'[sweep] {name}: {shlex.join(cmd)}', flush=True)
      code = run_trial(cmd)
      if code == errors.PREEMPTED_EXIT_CODE:  # The trial saved and stopped: so does the sweep.
        print(f'[sweep] {name}: stopped by a signal after saving its checkpoint; re-run the '
              'sweep to resume.', flush=True)
        status[name] = 'stopped'
        break
      status[name] = 'ran' if code == 0 else 'failed'
  return status


def run_trial(cmd):
  """The trial's exit status. Ctrl-C reaches the trial through the terminal's process group,
  and the trial then saves a checkpoint before it stops: wait for it (subprocess.run would
  kill it 0.25 s after the KeyboardInterrupt)."""
  with subprocess.Popen(cmd) as proc:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # After the fork: not inherited.
    try:
      return proc.wait()
    finally:
      signal.signal(signal.SIGINT, previous)


def main(argv):
  # Unparsed --config.* flags are overrides for every trial.
  extra = [a for a in argv[1:] if a.startswith('--config.')]
  rest = [a for a in argv[1:] if not a.startswith('--config.')]
  if rest:
    raise app.UsageError(f'unexpected arguments {rest}')
  passed = {'distributed': _DISTRIBUTED.value, 'coordinator_address': _COORDINATOR.value,
            'num_processes': _NUM_PROCESSES.value, 'process_id': _PROCESS_ID.value}
  extra = [f'--{k}={v}' for k, v in passed.items() if v is not None] + extra
  status = run_sweep(_CONFIG.value, _SWEEP.value, _WORKDIR.value, only=_ONLY.value,
                     dry_run=_DRY_RUN.value, extra=extra)
  failed = [n for n, s in status.items() if s == 'failed']
  print(f'[sweep] {len(status)} trials: ' + ', '.join(f'{n} {s}' for n, s in status.items()))
  if 'stopped' in status.values():
    sys.exit(errors.PREEMPTED_EXIT_CODE)
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  # absl would reject the --config.* overrides: pass them to main() as arguments.
  passthrough = [a for a in sys.argv[1:] if a.startswith('--config.')]
  app.run(main, argv=[a for a in sys.argv if a not in passthrough] + ['--'] + passthrough)
