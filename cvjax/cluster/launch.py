"""Launches runs and sweeps on a Cloud TPU slice or a Slurm cluster (`launch.sh tpu|slurm`).

  ./launch.sh tpu --name=NAME --zone=ZONE --type=v4-16 [--spot] [--delete] [--parallel=N]
      [--dry-run] CONFIG WORKDIR [--sweep=FILE[:arg]] [--only=a,b] [--config.x=v ...]
  ./launch.sh slurm --nodes=N --gpus_per_node=G [--partition=P] [--time=T] [--dry-run]
      CONFIG WORKDIR [--sweep=FILE[:arg]] [--only=a,b] [--config.x=v ...]

Cloud TPU: create the slice through a queued resource (or reuse an existing one), wait until
it is ACTIVE, copy the code to every worker, make a Python >= 3.11 virtual environment there
with only what the run needs (`jax[tpu]`, cvjax's core packages; grain, simplejpeg and OpenCV
when the data streams, tensorflow-datasets when it comes by tfds name; versions from
requirements.txt), run `cvjax.main` (or `cvjax.sweep`, trials one after another) on all
workers at once with their output streamed here, and with --delete delete the slice at the
end. --parallel=N
gives each trial of a sweep its own slice (NAME-TRIAL), N at a time.
Slurm: write an sbatch script whose `srun` starts one process per GPU (JAX reads its
rank, the process count and the coordinator from Slurm's environment), and submit it.
--dry-run prints every command (and the script) and runs nothing.
"""

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from cvjax import sweep as sweep_lib
from cvjax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JAX_VERSION = '0.10.2'  # Its wheels need Python >= 3.11 (3.10 gets none).
MIN_PYTHON = (3, 11)
# What the runs need on the TPU VMs (the tests and benchmarks stay here).
CODE = ('cvjax', 'configs', 'experiments', 'requirements.txt', 'launch.sh')
CODE_ARCHIVE = 'cvjax-code.tar.gz'  # Made in a temporary folder, removed after the copy.
REMOTE_DIR = '~/cvjax'
REMOTE_PYTHON = '.venv/bin/python'  # In REMOTE_DIR: the environment the install makes.
# Pinned in requirements.txt; a TPU run needs these (not the tests, the notebook, TensorBoard's
# viewer or the oneDNN CPU convolutions), plus jax[tpu] and what its data needs (DATA_PACKAGES).
CORE_PACKAGES = ('flax', 'optax', 'orbax-checkpoint', 'etils', 'filelock', 'ml-collections',
                 'absl-py', 'numpy', 'pillow', 'tensorboardX', 'matplotlib')
DATA_PACKAGES = {'streaming': ('grain', 'simplejpeg', 'opencv-python-headless'),
                 'tfds': ('tensorflow-cpu', 'tensorflow-datasets', 'importlib_resources')}
# TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = (('v6e', 'v2-alpha-tpuv6e'), ('v5p', 'v2-alpha-tpuv5'),
                    ('v5litepod', 'v2-alpha-tpuv5-lite'), ('v5e', 'v2-alpha-tpuv5-lite'))
DEFAULT_RUNTIME_VERSION = 'tpu-ubuntu2204-base'  # v4 and older.
POLL_SECONDS = 30


class LaunchError(Exception):
  """Bad launcher input or a missing tool: one paragraph, exit code 2."""


def parse(argv):
  parser = argparse.ArgumentParser(prog='launch.sh', allow_abbrev=False)
  targets = parser.add_subparsers(dest='target', required=True)
  tpu = targets.add_parser('tpu', help='Cloud TPU VM slice through queued resources.',
                           allow_abbrev=False)
  tpu.add_argument('--name', help='Queued resource and TPU node name (lowercase, digits, -).')
  tpu.add_argument('--zone', help='e.g. us-central2-b.')
  tpu.add_argument('--type', help='Accelerator type, e.g. v4-8, v4-32, v5litepod-16.')
  tpu.add_argument('--project', help='Google Cloud project (default: gcloud config).')
  tpu.add_argument('--runtime_version', help='TPU software version (default: by --type).')
  tpu.add_argument('--spot', action='store_true', help='Spot capacity: cheaper, preemptible.')
  tpu.add_argument('--delete', action='store_true', help='Delete the slice(s) at the end.')
  tpu.add_argument('--parallel', type=int, default=0,
                   help='Sweeps: one slice per trial, this many at a time.')
  slurm = targets.add_parser('slurm', help='sbatch job, one process per GPU.',
                             allow_abbrev=False)
  slurm.add_argument('--nodes', type=int)
  slurm.add_argument('--gpus_per_node', type=int)
  slurm.add_argument('--partition')
  slurm.add_argument('--time', help='Time limit, e.g. 24:00:00.')
  slurm.add_argument('--job_name', default='cvjax')
  for p in (tpu, slurm):
    p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                   help='Print every command, run nothing.')
    p.add_argument('config', help='Config file[:arg].')
    p.add_argument('workdir', help='Run (or sweep) directory; gs://... for a TPU slice.')
    p.add_argument('--sweep', help='Sweep file[:arg]: run its trials.')
    p.add_argument('--only', default='', help='Sweeps: only these trials (comma-separated).')
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    raise LaunchError(f'unexpected arguments {bad}: after CONFIG WORKDIR only --sweep, --only '
                      'and --config.field=value overrides are passed on.')
  args.overrides = rest
  args.only = [n for n in args.only.split(',') if n]
  return args


# What each target accepts (anything else is refused, never quoted into a name): a value
# starting with '-' would become a flag of gcloud or sbatch, and a newline a line of the job.
NAMES = {
    'name': (r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', 'a TPU name: lowercase letters, digits and '
             '"-", starting with a letter, at most 63 characters'),
    'zone': (r'[a-z]+-[a-z]+[0-9]+-[a-z]', 'a Cloud zone such as us-central2-b'),
    'type': (r'[a-z0-9]+-[0-9]+', 'an accelerator type such as v4-8 or v5litepod-16'),
    'project': (r'([a-z][a-z0-9.-]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]', 'a Cloud project ID'),
    'runtime_version': (r'[a-z0-9][-a-z0-9.]*', 'a TPU software version such as '
                        'tpu-ubuntu2204-base'),
    'job_name': (r'[A-Za-z0-9][A-Za-z0-9._-]{0,63}', 'a job name: letters, digits, ".", "_" '
                 'and "-" (it also names the script WORKDIR/JOB_NAME.sbatch)'),
    'partition': (r'[A-Za-z0-9_][A-Za-z0-9_.-]*(,[A-Za-z0-9_][A-Za-z0-9_.-]*)*',
                  'a Slurm partition name, or several separated by commas'),
    'time': (r'(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite',
             'a Slurm time limit: MINUTES, HH:MM:SS, D-HH:MM:SS or UNLIMITED'),
}


def check_values(args):
  """Refuses values that the target would not take as the name they are: a `--name` that
  gcloud would read as a flag, a `--job_name` that leaves WORKDIR, a newline that the sbatch
  script would run as a command."""
  for key, (pattern, what) in NAMES.items():
    value = getattr(args, key, None)
    if value not in (None, '') and not re.fullmatch(pattern, value):
      raise LaunchError(f'--{key}={value!r} is not {what}.')
  for key in ('config', 'workdir', 'sweep'):
    value = getattr(args, key, None) or ''
    if value.startswith('-') or any(c in value for c in '\n\r\0'):
      raise LaunchError(f'{key.upper()}={value!r}: expected a path (not starting with "-", '
                        'without line breaks).')
  if args.target == 'slurm' and re.search(r'\s|["\'\\]', args.workdir):
    raise LaunchError(f'WORKDIR={args.workdir!r}: the sbatch script names it in an #SBATCH line, '
                      'which takes no spaces or quotes; choose a path without them.')
  bad = [o for o in args.overrides if any(c in o for c in '\n\r\0')]
  if bad:
    raise LaunchError(f'overrides {bad} hold line breaks.')


def require(args, names, example):
  missing = [f'--{n}' for n in names if getattr(args, n) in (None, '')]
  if missing:
    raise LaunchError(f'launch.sh {args.target} needs {", ".join(missing)}; e.g. {example}')


def require_tool(tool, why):
  if shutil.which(tool) is None:
    raise LaunchError(f'`{tool}` was not found on PATH; {why} Use --dry-run to see the '
                      'commands without running them.')


def trials(args):
  """[(name, overrides)] of the sweep, filtered by --only; [] for a single run."""
  if not args.sweep:
    if args.only or getattr(args, 'parallel', 0):
      raise LaunchError('--only and --parallel apply to sweeps; add --sweep=FILE[:arg].')
    return []
  try:
    all_trials = sweep_lib.load_trials(args.sweep)
  except Exception as e:  # pylint: disable=broad-except  # A missing or broken sweep file.
    raise LaunchError(f'--sweep={args.sweep}: {e}') from None
  unknown = set(args.only) - {n for n, _ in all_trials}
  if unknown:
    raise LaunchError(f'--only names unknown trials {sorted(unknown)}; the sweep has '
                      f'{[n for n, _ in all_trials]}.')
  return [(n, o) for n, o in all_trials if not args.only or n in args.only]


def train_command(args, python, distributed=()):
  """The command every process runs: cvjax.sweep for a sweep, else cvjax.main."""
  if args.sweep:
    return [python, '-m', 'cvjax.sweep', f'--config={args.config}', f'--sweep={args.sweep}',
            f'--workdir={args.workdir}', *([f'--only={",".join(args.only)}'] if args.only else []),
            *distributed, *args.overrides]
  return [python, '-m', 'cvjax.main', f'--config={args.config}', f'--workdir={args.workdir}',
          *distributed, *args.overrides]


# --- Cloud TPU ---

def pinned(names):
  """requirements.txt's lines (without comments) for the packages `names`, in its order, with
  their environment markers: the worker's pip picks the versions pinned for its Python."""
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    lines = [l.split('#')[0].strip() for l in f]
  name = lambda l: re.split(r'[\[=<>!~;\s]', l, maxsplit=1)[0].lower()
  found = [l for l in lines if l and name(l) in {n.lower() for n in names}]
  missing = {n.lower() for n in names} - {name(l) for l in found}
  if missing:
    raise LaunchError(f'requirements.txt pins no {sorted(missing)}, which a TPU run installs.')
  return found


def data_needs(args, runs):
  """What the data of `runs` (their config overrides) needs beyond the core: 'streaming'
  (grain: ImageNet, dataset.pipeline=streaming, or an image folder on the VM that may stream)
  and 'tfds' (a dataset by name that does not ship with cvjax)."""
  from cvjax.data import memory  # pylint: disable=g-import-not-at-top
  path, _, arg = args.config.partition(':')
  try:
    # As the workers read it: relative to the code copied there (the repository's root).
    spec = importlib.util.spec_from_file_location('launched_config', os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dataset = module.get_config(arg or None).dataset
  except Exception as e:  # pylint: disable=broad-except  # A missing or broken config file.
    raise LaunchError(f'CONFIG={args.config}: {type(e).__name__}: {e}') from None
  needs = set()
  for overrides in runs:
    d = {k: dataset.get(k, '') for k in ('name', 'path', 'pipeline')}
    d.update({k[len('dataset.'):]: str(v) for k, v in overrides.items()
              if k[len('dataset.'):] in d and k.startswith('dataset.')})
    if d['pipeline'] == 'streaming' or d['name'].startswith('imagenet') or (
        d['path'] and d['pipeline'] in ('', 'auto')):
      needs.add('streaming')
    if not d['path'] and d['name'] not in memory.EMBEDDED_DATASETS:
      needs.add('tfds')
  return needs


def overrides_of(args, trial_overrides=()):
  """The --config.x=v overrides of the command line as {x: v}, then a trial's."""
  out = dict(o[len('--config.'):].split('=', 1) for o in args.overrides if '=' in o)
  return {**out, **dict(trial_overrides)}


def install_script(packages):
  """The install step each TPU worker runs: unpack the code, find a Python >= 3.11 (python3
  first; the Ubuntu 22.04 images have 3.10: then apt-get's python3.11), make REMOTE_DIR/.venv
  with it and install `packages` there; without such a Python, stop with what to do."""
  want = '.'.join(map(str, MIN_PYTHON))
  probe = f'import sys; sys.exit(sys.version_info < {MIN_PYTHON})'
  candidates = ['python3'] + [f'python3.{m}' for m in (13, 12, 11)]
  return '; '.join([
      f'set -e; mkdir -p {REMOTE_DIR}; tar -xzf {CODE_ARCHIVE} -C {REMOTE_DIR}; '
      f'rm -f {CODE_ARCHIVE}; cd {REMOTE_DIR}',
      'echo "$(hostname): $(python3 --version 2>&1)"; PY=',
      f'find_python() {{ for p in {" ".join(candidates)}; do if command -v $p >/dev/null 2>&1 '
      f'&& $p -c {shlex.quote(probe)} 2>/dev/null; then PY=$p; return; fi; done; }}; '
      'find_python',
      # Ubuntu 22.04 (the v4 and older images) has 3.10, and 3.11 in its own archive.
      f'if [ -z "$PY" ] && command -v apt-get >/dev/null 2>&1; then echo "$(hostname): '
      f'installing python{want} (apt-get)"; sudo apt-get -qq update && sudo apt-get -qq install '
      f'-y python{want} python{want}-venv >/dev/null || true; find_python; fi',
      f'if [ -z "$PY" ]; then echo "launch.sh: cvjax needs Python >= {want} (jax {JAX_VERSION} '
      f'has no wheels for older ones) and this TPU VM has $(python3 --version 2>&1) only. '
      f'Create the slice with a TPU software version (--runtime_version) whose image has '
      f'Python {want}+, or install one on the VM first (uv python install {want}, or pyenv) '
      f'and re-run." >&2; exit 3; fi',
      '$PY -m venv .venv || { echo "launch.sh: $PY -m venv failed: install its venv module '
      '(e.g. sudo apt-get install python3-venv) and re-run." >&2; exit 3; }',
      f'{REMOTE_PYTHON} -m pip install -q --upgrade pip',
      f'{REMOTE_PYTHON} -m pip install -q {shlex.join(packages)}'])


def runtime_version(accelerator_type):
  for prefix, version in RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix):
      return version
  return DEFAULT_RUNTIME_VERSION


def tpu_steps(args, name, command, packages, archive, results=None):
  """[(kind, argv or text)] for one slice: create-or-reuse, wait, copy, install, run, delete.

  kind 'run' is a command to run; 'if_absent' one run only when the describe before it
  failed; 'wait' a describe polled until ACTIVE; 'finished' a listing that, when it finds
  `results` (a trial's results.json), skips the slice; 'note' a comment.
  """
  where = [f'--zone={args.zone}', *([f'--project={args.project}'] if args.project else [])]
  qr = ['gcloud', 'compute', 'tpus', 'queued-resources']
  vm = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  describe = [*qr, 'describe', name, *where, '--format=value(state.state)']
  install = install_script(packages)
  steps = [('finished', ['gcloud', 'storage', 'ls', results])] if results else []
  steps += [
      ('note', f'slice {name}: reuse it if it exists, else queue it'),
      ('exists', describe),
      ('if_absent', [*qr, 'create', name, f'--node-id={name}', *where,
                     f'--accelerator-type={args.type}',
                     f'--runtime-version={args.runtime_version or runtime_version(args.type)}',
                     *(['--spot'] if args.spot else [])]),
      ('note', f'wait until {name} is ACTIVE (polled every {POLL_SECONDS} s)'),
      ('wait', describe),
      ('run', [*vm, 'scp', archive, f'{name}:', *where, '--worker=all']),
      ('run', [*vm, 'ssh', name, *where, '--worker=all', f'--command={install}']),
      ('run', [*vm, 'ssh', name, *where, '--worker=all',
               f'--command=cd {REMOTE_DIR} && {shlex.join(command)}']),
  ]
  if args.delete:
    steps.append(('run', [*qr, 'delete', name, *where, '--force', '--quiet']))
  return steps


def print_steps(steps):
  for kind, what in steps:
    if kind == 'note':
      print(f'# {what}')
    elif kind == 'finished':
      print(f'# skip this trial if it is finished:\n{shlex.join(what)}')
    elif kind == 'if_absent':
      print(f'# if the describe above finds no such queued resource:\n{shlex.join(what)}')
    else:
      print(shlex.join(what))


_print_lock = threading.Lock()


def _run(argv, prefix):
  """Runs a command, streaming its output (prefixed per trial when slices run in parallel)."""
  with _print_lock:
    print(f'{prefix}$ {shlex.join(argv)}', flush=True)
  if not prefix:
    return subprocess.run(argv, check=False).returncode
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    with _print_lock:
      print(f'{prefix}{line}', end='', flush=True)
  return proc.wait()


def execute_steps(steps, prefix=''):
  exists = False
  for kind, what in steps:
    if kind == 'note':
      continue
    if kind == 'finished':
      if subprocess.run(what, capture_output=True, check=False).returncode == 0:
        with _print_lock:
          print(f'{prefix}finished ({what[-1]} exists), skipped.', flush=True)
        return
    elif kind == 'exists':
      exists = subprocess.run(what, capture_output=True, check=False).returncode == 0
    elif kind == 'if_absent':
      if not exists and _run(what, prefix):
        raise RuntimeError(f'{shlex.join(what)} failed.')
    elif kind == 'wait':
      while True:
        state = subprocess.run(what, capture_output=True, text=True, check=False).stdout.strip()
        if state == 'ACTIVE':
          break
        if state in ('FAILED', 'SUSPENDED'):
          raise RuntimeError(f'the queued resource is {state}: `{shlex.join(what[:-1])}` '
                             'says why.')
        with _print_lock:
          print(f'{prefix}queued resource state: {state or "(not visible yet)"}', flush=True)
        time.sleep(POLL_SECONDS)
    elif _run(what, prefix):
      raise RuntimeError(f'{shlex.join(what)} failed.')


def launch_tpu(args):
  require(args, ('name', 'zone', 'type'),
          './launch.sh tpu --name=my-tpu --zone=us-central2-b --type=v4-8 configs/resnet.py '
          'gs://my-bucket/runs/resnet20')
  check_values(args)
  if args.parallel < 0:
    raise LaunchError(f'--parallel={args.parallel}; expected a positive number of slices.')
  remote = workdir.is_remote(args.workdir)
  if not remote and (args.delete or args.parallel):
    raise LaunchError(f'WORKDIR {args.workdir} is a path on the TPU VM: with --delete or '
                      '--parallel its checkpoints and results would be lost with the slice. '
                      'Use a bucket the slice can write, e.g. gs://my-bucket/runs/depth.')
  distributed = ['--distributed=on']
  # The archive of the code, in a folder of its own (never the repository) removed at the end.
  tmp = tempfile.mkdtemp(prefix='cvjax-launch-')
  archive = os.path.join(tmp, CODE_ARCHIVE)
  try:
    return _launch_tpu(args, distributed, archive)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _launch_tpu(args, distributed, archive):
  remote = workdir.is_remote(args.workdir)
  runs = [overrides_of(args, o) for _, o in trials(args)] or [overrides_of(args)]
  packages = [l.replace('jax==', 'jax[tpu]==', 1) for l in pinned(('jax',))] + pinned(
      CORE_PACKAGES + tuple(p for need in sorted(data_needs(args, runs))
                            for p in DATA_PACKAGES[need]))
  if args.parallel:
    plans = []
    for trial, overrides in trials(args):
      name = f'{args.name}-{trial}'.lower().replace('_', '-')
      if not re.fullmatch(NAMES['name'][0], name):
        raise LaunchError(f'trial {trial!r} would run on a slice named {name!r}, which is not '
                          f'{NAMES["name"][1]}; rename the trial or shorten --name.')
      command = sweep_lib.trial_command(args.config, args.workdir, trial, overrides,
                                        [*distributed, *args.overrides], python=REMOTE_PYTHON)
      plans.append((name, tpu_steps(
          args, name, command, packages, archive,
          results=f'{args.workdir.rstrip("/")}/{trial}/results.json')))
  else:
    plans = [(args.name, tpu_steps(args, args.name,
                                   train_command(args, REMOTE_PYTHON, distributed), packages,
                                   archive))]
  pack = ['tar', '-czf', archive, '--exclude=__pycache__', '-C', os.path.relpath(ROOT), *CODE]
  if args.dry_run:
    print(f'# package the code ({", ".join(CODE)})\n{shlex.join(pack)}')
    for _, steps in plans:
      print_steps(steps)
    return 0
  require_tool('gcloud', 'install the Google Cloud CLI (cloud.google.com/sdk) and run '
               '`gcloud auth login`.')
  if not remote:
    print(f'note: WORKDIR {args.workdir} is local to each TPU VM; a multi-host slice needs a '
          'shared gs:// WORKDIR.', file=sys.stderr)
  if _run(pack, ''):
    raise RuntimeError('packaging the code failed.')
  if not args.parallel:
    execute_steps(plans[0][1])
    return 0
  failed = []

  def one(name_steps):
    name, steps = name_steps
    try:
      execute_steps(steps, prefix=f'[{name}] ')
    except RuntimeError as e:
      with _print_lock:
        print(f'[{name}] failed: {e}', flush=True)
      failed.append(name)
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    list(pool.map(one, plans))
  print(f'{len(plans) - len(failed)} of {len(plans)} slices finished'
        + (f'; failed: {", ".join(failed)}' if failed else '.'))
  return 1 if failed else 0


# --- Slurm ---

def sbatch_script(args):
  trials(args)
  log_dir = '.' if workdir.is_remote(args.workdir) else args.workdir
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={args.job_name}',
           f'#SBATCH --nodes={args.nodes}',
           f'#SBATCH --ntasks-per-node={args.gpus_per_node}',  # One process per GPU.
           f'#SBATCH --gpus-per-node={args.gpus_per_node}',
           *([f'#SBATCH --partition={args.partition}'] if args.partition else []),
           *([f'#SBATCH --time={args.time}'] if args.time else []),
           f'#SBATCH --output={os.path.join(log_dir, "slurm-%j.out")}',
           '# JAX reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list: each task',
           '# drives the GPU of its local rank, process 0 coordinates and writes the logs.',
           '# The job starts in the directory sbatch ran from: the repository root.',
           'set -euo pipefail',
           'srun ' + shlex.join(train_command(args, 'python')),
           '']
  return '\n'.join(lines)


def launch_slurm(args):
  require(args, ('nodes', 'gpus_per_node'),
          './launch.sh slurm --nodes=2 --gpus_per_node=4 configs/resnet.py runs/resnet20')
  check_values(args)
  if args.nodes <= 0 or args.gpus_per_node <= 0:
    raise LaunchError(f'--nodes={args.nodes} --gpus_per_node={args.gpus_per_node}; expected '
                      'positive numbers.')
  script = sbatch_script(args)
  local = not workdir.is_remote(args.workdir)
  path = os.path.join(args.workdir if local else '.', f'{args.job_name}.sbatch')
  submit = ['sbatch', path]
  if args.dry_run:
    print(f'# {path}:\n{script}# submit\n{shlex.join(submit)}')
    return 0
  require_tool('sbatch', 'run this on a Slurm login node.')
  if local:
    os.makedirs(args.workdir, exist_ok=True)
  with open(path, 'w') as f:
    f.write(script)
  print(f'wrote {path}\n$ {shlex.join(submit)}', flush=True)
  return subprocess.run(submit, check=False).returncode


def main(argv):
  try:
    args = parse(argv)
    return launch_tpu(args) if args.target == 'tpu' else launch_slurm(args)
  except LaunchError as e:
    print(f'launch.sh: error: {e}', file=sys.stderr)
    return 2
  except RuntimeError as e:
    print(f'launch.sh: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
