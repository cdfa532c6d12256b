"""Runs a sweep: each trial of an experiments/ file as its own `cvjax.main` run.

  python -m cvjax.sweep --config=configs/resnet.py --sweep=experiments/depth_ablation.py:quick \
      --workdir=runs/depth [--only=plain20,resnet20] [--dry_run] [--config.x.y=value ...]

A sweep file defines `get_trials(arg) -> [(name, {field: value})]`. Trial `name` trains in
WORKDIR/name with the base config, the trial's own fields, then the `--config.*` overrides
given here: the command line wins over the sweep file (`--config.population.seeds=2` over a
trial's `population.seeds=3`). An override of a field the trials differ by (the depth of a
depth sweep) would make them one run under several names: that is an error; pick trials with
--only. A trial whose workdir holds results.json is finished and skipped; an interrupted one
resumes from its checkpoint. `--dry_run` prints the commands instead.
"""

import contextlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import traceback

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
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', None, 'Seconds each trial waits for its peers to join.')
flags.mark_flags_as_required(['config', 'sweep', 'workdir'])


TRIAL_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')  # A folder, a slice name, a bucket path.


def load_trials(spec):
  """`path[:arg]` -> [(name, overrides)]; a sweep file that fails to load, or trials that are
  not (name, {field: value}) pairs with valid names, are a UserError naming the file."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise errors.UserError(f'--sweep={spec}: {path} is not a file.')
  try:
    module_spec = importlib.util.spec_from_file_location('sweep', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_trials'):
      raise errors.UserError(f'sweep file {path} has no get_trials(); a sweep file defines '
                             '`def get_trials(arg=None)` returning [(name, {field: value})].')
    trials = module.get_trials(arg or None)
  except errors.UserError:
    raise
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    raise errors.UserError(f'sweep file {path}{_where(e, path)}: {type(e).__name__}: '
                           f'{getattr(e, "msg", None) or e}') from None
  if not isinstance(trials, (list, tuple)) or not all(
      isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[1], dict) for t in trials):
    raise errors.UserError(f'sweep file {path}: get_trials() returned {type(trials).__name__} '
                           f'{str(trials)[:80]}; expected a list of (name, {{field: value}}).')
  names = [name for name, _ in trials]
  for name in names:
    if not isinstance(name, str) or not TRIAL_NAME.fullmatch(name) or name in ('.', '..'):
      raise errors.UserError(
          f'sweep file {path}: trial name {name!r} is not a plain folder name. A trial trains '
          'in WORKDIR/NAME (and on TPU names a slice): letters, digits, ".", "_" and "-", '
          'starting with a letter or digit, no "/" or "..".')
  if len(set(names)) != len(names):
    raise errors.UserError(f'{path}: trial names must be unique, got {names}.')
  return trials


def _where(e, path):
  """', line N' of the sweep file where `e` was raised, if it was raised there."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f', line {e.lineno}'
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.exists(f.filename) and os.path.samefile(f.filename, path)]
  return f', line {frames[-1].lineno}' if frames else ''


def format_value(value):
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def trial_command(config, workdir, name, overrides, extra=(), python=sys.executable):
  """The trial's cvjax.main command: the trial's fields, then `extra` (the command line's
  overrides, which win: later flags replace earlier ones)."""
  return [python, '-m', 'cvjax.main', f'--config={config}',
          f'--workdir={os.path.join(workdir, name)}',
          *(f'--config.{k}={format_value(v)}' for k, v in overrides.items()), *extra]


def user_fields(extra):
  """{field: the command line's text} of the `--config.FIELD=VALUE` overrides in `extra`."""
  out = {}
  for arg in extra:
    if arg.startswith('--config.'):
      field, _, value = arg[len('--config.'):].partition('=')
      out[field] = value
  return out


def with_user_overrides(trials, extra):
  """The trials without the fields the command line sets (the user's value wins), each
  replaced field noted; a UserError when the trials differ by such a field."""
  given = user_fields(extra)
  for field, value in given.items():
    theirs = {name: o[field] for name, o in trials if field in o}
    if len({repr(v) for v in theirs.values()}) > 1:
      raise errors.UserError(
          f'--config.{field}={value} would replace the field these trials differ by ('
          + ', '.join(f'{n}: {format_value(v)}' for n, v in theirs.items())
          + '), making them one run under several names. Leave it to the sweep file, or pick '
          'the trial(s) with --only=NAME,... .')
    for name, v in theirs.items():
      print(f'[sweep] {name}: --config.{field}={value} (command line) replaces the trial\'s '
            f'{field}={format_value(v)}.', flush=True)
  return [(name, {k: v for k, v in o.items() if k not in given}) for name, o in trials]


def is_finished(trial_dir):
  return (epath.Path(trial_dir) / 'results.json').exists()


def run_sweep(config, sweep, workdir, *, only=(), dry_run=False, extra=()):
  """Runs (or prints) the trials; returns {name: 'skipped'|'ran'|'failed'|'dry-run'}."""
  trials = load_trials(sweep)
  unknown = set(only) - {name for name, _ in trials}
  if unknown:
    raise errors.UserError(f'--only names unknown trials {sorted(unknown)}; the sweep has '
                           f'{[n for n, _ in trials]}.')
  trials = with_user_overrides([(n, o) for n, o in trials if not only or n in only], extra)
  status, stop = {}, []
  with stopping_between_trials(stop):
    for name, overrides in trials:
      if only and name not in only:
        continue
      if stop:  # A signal between trials: start no other.
        print(f'[sweep] stopped by {stop[0]} before trial {name}.', flush=True)
        status[name] = 'stopped'
        break
      cmd = trial_command(config, workdir, name, overrides, extra)
      if dry_run:
        print(shlex.join(cmd))
        status[name] = 'dry-run'
      elif is_finished(os.path.join(workdir, name)):
        print(f'[sweep] {name}: finished, skipped.', flush=True)
        status[name] = 'skipped'
      else:
        print(f'[sweep] {name}: {shlex.join(cmd)}', flush=True)
        code = run_trial(cmd, stop, os.path.join(workdir, name))
        if code == errors.PREEMPTED_EXIT_CODE:  # The trial saved and stopped: so does the sweep.
          print(f'[sweep] {name}: stopped by a signal after saving its checkpoint; re-run the '
                'sweep to resume.', flush=True)
          status[name] = 'stopped'
          break
        status[name] = 'ran' if code == 0 else 'failed'
        if code:
          print(f'[sweep] {name}: {how_it_ended(code)}.', flush=True)
  return status


def how_it_ended(code):
  """A trial's end, from its exit status (a negative one: the signal that killed it)."""
  if code == 2:  # cvjax.errors.UserError
    return f'failed with exit status {code}: a configuration or input error (the paragraph above)'
  if code > 0:
    return f'failed with exit status {code} (its log above says why)'
  try:
    name = signal.Signals(-code).name
  except ValueError:
    name = f'signal {-code}'
  if name == 'SIGKILL':
    return ("killed by SIGKILL: the kernel's out-of-memory killer, most likely (`dmesg` or "
            '`journalctl -k` on this machine says so); the trial resumes from its last '
            'checkpoint when the sweep is re-run with fewer members, a smaller batch or more '
            'memory')
  return f'killed by {name}'


def run_trial(cmd, stop=None, trial_dir=None):
  """The trial's exit status. The trial runs in its own session, and SIGTERM or SIGINT to the
  sweep (Ctrl-C, a scheduler, `kill PID`) is passed on to it once: the trial saves a
  checkpoint and stops, and the sweep waits for it (subprocess.run would kill it 0.25 s
  after a KeyboardInterrupt). `stop` gets the signal's name. A trial killed by a signal
  (SIGKILL cannot be caught) leaves its lock in `trial_dir`: removed."""
  stop = [] if stop is None else stop
  with subprocess.Popen(cmd, start_new_session=True) as proc:
    try:
      return _wait(proc, stop)
    finally:
      if trial_dir and proc.returncode is not None and proc.returncode < 0:
        from cvjax import run_lock  # pylint: disable=g-import-not-at-top
        if run_lock.remove_if_held_by(trial_dir, proc.pid):
          print(f'[sweep] removed the lock the killed trial left in {trial_dir}.', flush=True)


def _wait(proc, stop):
  """The trial's exit status, passing SIGTERM and SIGINT on to it."""
  def forward(signum, frame):
    del frame
    stop.append(signal.Signals(signum).name)
    print(f'[sweep] {signal.Signals(signum).name}: passed on to the trial; waiting for it to '
          'save its checkpoint.', flush=True)
    proc.send_signal(signum)
  ours = (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.signal(s, forward) for s in ours}  # After the fork: not inherited.
  try:
    while True:
      try:
        return proc.wait()
      except InterruptedError:
        continue
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


@contextlib.contextmanager
def stopping_between_trials(stop):
  """SIGTERM or SIGINT while no trial runs: finish the current step of the loop, then stop."""
  def note(signum, frame):
    del frame
    stop.append(signal.Signals(signum).name)
  ours = (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.signal(s, note) for s in ours}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def main(argv):
  # Unparsed --config.* flags are overrides for every trial.
  extra = [a for a in argv[1:] if a.startswith('--config.')]
  rest = [a for a in argv[1:] if not a.startswith('--config.')]
  passed = {'distributed': _DISTRIBUTED.value, 'coordinator_address': _COORDINATOR.value,
            'num_processes': _NUM_PROCESSES.value, 'process_id': _PROCESS_ID.value,
            'distributed_timeout': _DISTRIBUTED_TIMEOUT.value}
  extra = [f'--{k}={v}' for k, v in passed.items() if v is not None] + extra
  try:
    if rest:
      raise errors.UserError(f'unexpected argument(s) {" ".join(rest)}: flags are written '
                             '--name=value.')
    status = run_sweep(_CONFIG.value, _SWEEP.value, _WORKDIR.value, only=_ONLY.value,
                       dry_run=_DRY_RUN.value, extra=extra)
  except errors.UserError as e:
    print(f'cvjax.sweep: error: {e}', file=sys.stderr)
    sys.exit(2)
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
