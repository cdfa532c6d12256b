"""launch.sh tpu|slurm: what each target would run (--dry-run), and its errors.

No cloud or cluster exists here: the tests read the printed commands, and make sure a dry
run starts no process at all.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from cvjax.cluster import distributed, launch

TPU = ['tpu', '--name=depth', '--zone=us-central2-b', '--type=v4-32']
SLURM = ['slurm', '--nodes=2', '--gpus_per_node=4', '--partition=gpu', '--time=12:00:00']


@pytest.fixture
def dry(monkeypatch, capsys):
  """Runs launch.main with every way of starting a process disabled; returns (rc, lines)."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'a dry run started a process: {args}')
  monkeypatch.setattr(subprocess, 'run', refuse)
  monkeypatch.setattr(subprocess, 'Popen', refuse)
  monkeypatch.chdir(ROOT)

  def run(*argv):
    rc = launch.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err
  return run


def commands(lines, prefix):
  return [shlex.split(l) for l in lines if l.startswith(prefix)]


def test_tpu_run_dry_run_prints_every_step(dry):
  rc, lines, _ = dry(*TPU, '--spot', '--delete', '--dry-run', 'configs/resnet.py:resnet56',
                     'gs://bucket/r56', '--config.train.num_epochs=3')
  assert rc == 0
  gcloud = commands(lines, 'gcloud')
  assert gcloud[1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'depth',
                       '--node-id=depth', '--zone=us-central2-b', '--accelerator-type=v4-32',
                       '--runtime-version=tpu-ubuntu2204-base', '--spot']
  assert gcloud[0] == gcloud[2] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
                                    'depth', '--zone=us-central2-b',
                                    '--format=value(state.state)']
  archive = gcloud[3][5]
  assert gcloud[3] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, 'depth:',
                       '--zone=us-central2-b', '--worker=all']
  # The code archive is made outside the repository, and nothing is left there.
  assert os.path.basename(archive) == 'cvjax-code.tar.gz'
  assert not archive.startswith(ROOT) and not os.path.exists(os.path.dirname(archive))
  assert commands(lines, 'tar')[0][:3] == ['tar', '-czf', archive]
  install, train = gcloud[4][-1], gcloud[5][-1]
  assert gcloud[4][:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'depth',
                           '--zone=us-central2-b', '--worker=all']
  assert train == ('--command=cd ~/cvjax && .venv/bin/python -m cvjax.main '
                   '--config=configs/resnet.py:resnet56 --workdir=gs://bucket/r56 '
                   '--distributed=on --config.train.num_epochs=3')
  assert gcloud[6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'depth',
                       '--zone=us-central2-b', '--force', '--quiet']
  assert len(gcloud) == 7
  assert not os.path.exists(os.path.join(ROOT, 'cvjax-code.tar.gz'))


def requirements(install):
  """The requirements the install step of a dry run puts in the worker's environment (with
  requirements.txt's markers: the worker's pip picks its Python's pins)."""
  start = install.index('.venv/bin/python -m pip install -q ', install.index('--upgrade pip'))
  lexer = shlex.shlex(install[start:], posix=True, punctuation_chars=';')
  lexer.whitespace_split = True
  words = list(iter(lexer.get_token, None))
  return words[5:words.index(';') if ';' in words else None]


def installed(install):
  """The names of the packages of `requirements`, each once, in order."""
  return list(dict.fromkeys(re.split(r'[\[=<>;]', p)[0] for p in requirements(install)))


@pytest.mark.parametrize('config,extra', [
    ('configs/resnet.py:resnet56', ['tensorflow-cpu', 'tensorflow-datasets',
                                    'importlib_resources']),  # CIFAR-10 by tfds name.
    ('configs/resnet.py:imagenet', ['tensorflow-cpu', 'tensorflow-datasets',
                                    'importlib_resources', 'grain', 'simplejpeg',
                                    'opencv-python-headless']),  # tfds imagenet2012.
    ('configs/lenet.py', []),  # MNIST, embedded in cvjax.
])
def test_tpu_workers_make_a_python_3_11_environment_with_what_the_run_needs(dry, config,
                                                                              extra):
  overrides = ['--config.dataset.name=mnist10k'] if config == 'configs/lenet.py' else []
  if config.endswith('imagenet'):  # An image folder on the VM: the streaming packages alone.
    rc, lines, _ = dry(*TPU, '--dry-run', config, 'gs://b/w', '--config.dataset.path=/data/in')
    assert rc == 0
    assert installed(commands(lines, 'gcloud')[4][-1])[-3:] == ['grain', 'simplejpeg',
                                                                'opencv-python-headless']
  rc, lines, _ = dry(*TPU, '--dry-run', config, 'gs://b/w', *overrides)
  assert rc == 0
  install = commands(lines, 'gcloud')[4][-1]
  # python3 is asked first, then newer ones; the environment is made with the first >= 3.11.
  assert 'python3 --version' in install
  assert 'for p in python3 python3.13 python3.12 python3.11;' in install
  assert 'sudo apt-get -qq install -y python3.11 python3.11-venv' in install  # Ubuntu 22.04.
  assert 'sys.exit(sys.version_info < (3, 11))' in install
  assert '$PY -m venv .venv' in install
  assert installed(install) == ['jax', 'flax', 'optax', 'orbax-checkpoint', 'etils', 'filelock',
                                'ml-collections', 'absl-py', 'numpy', 'pillow', 'tensorboardX',
                                'matplotlib', *extra]
  assert {r for r in requirements(install) if r.startswith('jax[tpu]')} == {
      'jax[tpu]==0.10.2; python_version < "3.12"', 'jax[tpu]==0.12.1; python_version >= "3.12"'}
  for unneeded in ('requirements.txt', 'pytest', 'ipykernel', 'onednn', 'torch'):
    assert unneeded not in install


def test_tpu_worker_without_python_3_11_stops_with_what_to_do(tmp_path):
  """The install step on a VM whose Pythons are all older and that cannot get one (no
  apt-get): exit 3 with a message, before any environment or package."""
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  for tool in ('mkdir', 'tar', 'rm', 'hostname', 'gzip'):
    if shutil.which(tool):
      os.symlink(shutil.which(tool), bin_dir / tool)
  for python in ('python3', 'python3.10'):  # Python 3.10: the version probe fails.
    (bin_dir / python).write_text('#!/bin/bash\n[ "$1" = --version ] && echo Python 3.10.12 '
                                  '&& exit 0\nexit 1\n')
    (bin_dir / python).chmod(0o755)
  subprocess.run(['tar', '-czf', str(home / 'cvjax-code.tar.gz'), '-C', ROOT, 'launch.sh'],
                 check=True)
  script = launch.install_script(['jax[tpu]==0.10.2'])
  out = subprocess.run(['/bin/bash', '-c', script], cwd=home, capture_output=True, text=True,
                       env={'PATH': str(bin_dir), 'HOME': str(home)}, timeout=60)
  assert out.returncode == 3, out.stderr
  assert 'cvjax needs Python >= 3.11' in out.stderr and 'Python 3.10.12' in out.stderr
  assert '--runtime_version' in out.stderr and 'uv python install 3.11' in out.stderr
  assert not os.path.exists(home / 'cvjax' / '.venv')


def test_tpu_sweep_runs_its_trials_on_one_slice(dry):
  rc, lines, _ = dry(*TPU, '--dry-run', 'configs/resnet.py', 'gs://bucket/depth',
                     '--sweep=experiments/depth_ablation.py:quick', '--only=depth20,depth56')
  assert rc == 0
  gcloud = commands(lines, 'gcloud')
  assert sum(c[4] == 'create' for c in gcloud) == 1
  assert gcloud[-1][-1] == (
      '--command=cd ~/cvjax && .venv/bin/python -m cvjax.sweep --config=configs/resnet.py '
      '--sweep=experiments/depth_ablation.py:quick --workdir=gs://bucket/depth '
      '--only=depth20,depth56 --distributed=on')
  assert not any('delete' in c for c in gcloud)  # Kept without --delete.


def test_tpu_parallel_sweep_gives_each_trial_its_slice(dry):
  rc, lines, _ = dry(*TPU, '--parallel=3', '--dry-run', 'configs/resnet.py', 'gs://bucket/depth',
                     '--sweep=experiments/depth_ablation.py', '--config.seed=1')
  assert rc == 0
  gcloud = commands(lines, 'gcloud')
  creates = [c[5] for c in gcloud if c[3:5] == ['queued-resources', 'create']]
  assert creates == ['depth-depth20', 'depth-depth32', 'depth-depth44', 'depth-depth56',
                     'depth-resnet110']
  checks = [c[-1] for c in gcloud if c[1] == 'storage']
  assert checks[0] == 'gs://bucket/depth/depth20/results.json' and len(checks) == 5
  runs = [c[-1] for c in gcloud if c[3:5] == ['tpu-vm', 'ssh'] and 'cvjax.main' in c[-1]]
  # The trial's fields, then the command line's (later flags win: the user's over the file's).
  assert runs[-1] == ('--command=cd ~/cvjax && .venv/bin/python -m cvjax.main '
                      '--config=configs/resnet.py '
                      '--workdir=gs://bucket/depth/resnet110 '
                      '--config.model.depth=110 --config.model.residual=True '
                      '--config.schedule.warmup_steps=400 --config.population.seeds=5 '
                      '--distributed=on --config.seed=1')


def test_slurm_dry_run_prints_the_script_and_the_submission(dry):
  rc, lines, _ = dry(*SLURM, '--dry-run', 'configs/resnet.py', 'runs/depth',
                     '--sweep=experiments/depth_ablation.py:quick')
  assert rc == 0
  for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-node=4',
               '#SBATCH --partition=gpu', '#SBATCH --time=12:00:00',
               '#SBATCH --output=runs/depth/slurm-%j.out'):
    assert line in lines
  srun = [l for l in lines if l.startswith('srun ')]
  assert srun == ['srun python -m cvjax.sweep --config=configs/resnet.py '
                  '--sweep=experiments/depth_ablation.py:quick --workdir=runs/depth']
  assert lines[-1] == 'sbatch runs/depth/cvjax.sbatch'
  assert not os.path.exists(os.path.join(ROOT, 'runs', 'depth', 'cvjax.sbatch'))


@pytest.mark.parametrize('argv,message', [
    (['tpu', '--zone=z', '--type=v4-8', 'c.py', 'gs://b/w'], 'needs --name'),
    (['slurm', '--nodes=2', 'c.py', 'w'], 'needs --gpus_per_node'),
    ([*TPU, '--delete', 'configs/resnet.py', 'runs/local'], 'would be lost with the slice'),
    ([*TPU, '--parallel=2', 'configs/resnet.py', 'gs://b/w'], 'apply to sweeps'),
    ([*TPU, 'configs/resnet.py', 'gs://b/w', '--sweep=experiments/depth_ablation.py',
      '--only=resnet7'], 'unknown trials'),
    ([*TPU, 'configs/resnet.py', 'gs://b/w', '--sweep=experiments/nope.py'], 'is not a file'),
    ([*SLURM, 'configs/resnet.py', 'w', '--bogus'], 'unexpected arguments'),
])
def test_bad_launch_input_is_one_paragraph_and_exit_2(dry, argv, message):
  rc, _, err = dry(*argv, '--dry-run')
  assert rc == 2 and message in err and 'Traceback' not in err, err


@pytest.mark.parametrize('argv,tool', [([*TPU, 'configs/resnet.py', 'gs://b/w'], 'gcloud'),
                                       ([*SLURM, 'configs/resnet.py', 'w'], 'sbatch')])
def test_missing_cloud_tool_is_a_clear_error(dry, monkeypatch, argv, tool):
  monkeypatch.setenv('PATH', '/nonexistent')
  rc, _, err = dry(*argv)
  assert rc == 2 and f'`{tool}` was not found on PATH' in err, err


def test_launch_sh_dispatches_targets_and_reports_errors(tmp_path):
  # launch.sh runs with $PYTHON, else python3 from PATH: here, the Python running the tests.
  env = {**os.environ, 'PYTHON': sys.executable}
  out = subprocess.run(['./launch.sh', *SLURM, '--dry-run', 'configs/lenet.py', str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and 'srun python -m cvjax.main' in out.stdout, out.stderr
  out = subprocess.run(['./launch.sh', 'tpu', '--dry-run', 'configs/lenet.py', 'gs://b/w'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and 'needs --name, --zone, --type' in out.stderr
  assert 'Traceback' not in out.stderr


# --- When a run joins a multi-process group. ---

@pytest.fixture
def no_join(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda *a, **kw: calls.append(a))
  for var in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS',
              'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  return calls


def test_single_process_runs_do_not_join(no_join, monkeypatch):
  assert not distributed.initialize('auto')
  # A Slurm batch step or a one-task srun is one process.
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '1')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node1')
  monkeypatch.setenv('SLURM_PROCID', '0')
  assert not distributed.initialize('auto')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '1')
  assert not distributed.initialize('auto')
  assert not distributed.initialize('off', 'localhost:1', 2, 0)
  assert no_join == []


def test_groups_join_with_detection_or_explicit_flags(no_join, monkeypatch):
  assert distributed.initialize('auto', 'localhost:1234', 2, 1)
  assert distributed.initialize('on')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  assert distributed.initialize('auto')
  monkeypatch.delenv('OMPI_COMM_WORLD_SIZE')
  for var, value in (('SLURM_JOB_ID', '7'), ('SLURM_STEP_NUM_TASKS', '8'),
                     ('SLURM_STEP_NODELIST', 'node[1-2]'), ('SLURM_PROCID', '3')):
    monkeypatch.setenv(var, value)
  assert distributed.initialize('auto')
  assert no_join == [('localhost:1234', 2, 1), (None, None, None), (None, None, None),
                     (None, None, None)]


def test_half_given_coordinates_are_refused(no_join):
  with pytest.raises(distributed.UserError, match='go together'):
    distributed.initialize('auto', 'localhost:1234', None, None)
  assert no_join == []


def unreachable_coordinator(tmp_path, *flags):
  """`cvjax.main` as process 1 of 2 whose coordinator port nothing listens on."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  argv = [sys.executable, '-m', 'cvjax.main', '--config=configs/resnet.py:resnet8',
          f'--workdir={tmp_path / "run"}', f'--coordinator_address=127.0.0.1:{port}',
          '--num_processes=2', '--process_id=1', *flags]
  return port, subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_an_unreachable_coordinator_is_waited_for_aloud_then_a_clear_error(tmp_path):
  port, proc = unreachable_coordinator(tmp_path, '--distributed_timeout=3')
  err = proc.communicate(timeout=300)[1]
  assert proc.returncode == 2, err[-3000:]
  assert 'Traceback' not in err and 'Check failure' not in err, err[-3000:]
  assert (f'Joining the multi-process run as process 1 of 2: waiting for the coordinator at '
          f'127.0.0.1:{port}') in err
  assert re.search(r'cvjax: error: could not join the multi-process run as process 1 of 2 '
                   rf'within 3 s: nothing answers at the coordinator address 127.0.0.1:{port} '
                   r'\(Connection refused\)', err), err[-3000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_wait_for_the_coordinator_stops_on_a_signal(tmp_path, sig):
  _, proc = unreachable_coordinator(tmp_path)  # Would wait JAX's 300 s.
  lines = []
  try:
    for line in proc.stderr:  # Until JAX says it connects (and blocks).
      lines.append(line)
      if 'Connecting to JAX distributed service' in line:
        break
    time.sleep(2)  # Inside JAX's wait by now.
    proc.send_signal(sig)
    err = ''.join(lines) + proc.communicate(timeout=30)[1]
  finally:
    proc.kill()
    proc.wait()
  assert 'waiting for the coordinator' in err
  assert proc.returncode == 75, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert f'cvjax: stopped by {sig.name} while no training step was running' in err


def test_sweep_passes_the_coordinator_flags_to_every_trial():
  out = subprocess.run(
      [sys.executable, '-m', 'cvjax.sweep', '--config=configs/resnet.py',
       '--sweep=experiments/depth_ablation.py', '--workdir=runs/depth', '--only=depth20,resnet110',
       '--dry_run', '--coordinator_address=host0:1234', '--num_processes=2', '--process_id=1',
       '--distributed_timeout=900', '--config.seed=3'], cwd=ROOT, capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  trials = [shlex.split(l) for l in out.stdout.splitlines() if 'cvjax.main' in l]
  assert len(trials) == 2
  for argv in trials:  # After the trial's own fields: the command line wins.
    assert argv[-5:] == ['--coordinator_address=host0:1234', '--num_processes=2',
                         '--process_id=1', '--distributed_timeout=900', '--config.seed=3'], argv


# --- Values that reach a shell or a script: refused, or quoted ---

@pytest.mark.parametrize('argv,message', [
    ([*SLURM, '--partition=gpu\necho pwned', 'configs/resnet.py', 'w'], "--partition='gpu\\necho"),
    ([*SLURM, '--job_name=../../x', 'configs/resnet.py', 'w'], "--job_name='../../x' is not"),
    ([*SLURM, '--time=1:00\nrm -rf ~', 'configs/resnet.py', 'w'], 'a Slurm time limit'),
    ([*SLURM, 'configs/resnet.py', 'w\n#SBATCH --x'], 'without line breaks'),
    ([*SLURM, 'configs/resnet.py', 'my runs/w'], 'takes no spaces or quotes'),
    (['tpu', '--name=--impersonate-service-account=a@b', '--zone=us-central2-b', '--type=v4-8',
      'configs/resnet.py', 'gs://b/w'], "--name='--impersonate-service-account=a@b' is not a TPU"),
    (['tpu', '--name=x', '--zone=us-central2-b;id', '--type=v4-8', 'configs/resnet.py',
      'gs://b/w'], 'a Cloud zone'),
])
def test_values_a_target_would_misread_are_refused(dry, argv, message):
  rc, _, err = dry(*argv, '--dry-run')
  assert rc == 2 and message in err and 'Traceback' not in err, err


def test_trial_names_that_make_bad_slice_names_are_refused(dry, tmp_path):
  (tmp_path / 's.py').write_text('def get_trials(arg=None):\n  return [("v1.5", {})]\n')
  rc, _, err = dry(*TPU, '--parallel=1', 'configs/resnet.py', 'gs://b/w', f'--sweep={tmp_path}/s.py')
  assert rc == 2 and "trial 'v1.5' would run on a slice named 'depth-v1.5'" in err, err


STAND_IN = '''#!/bin/bash
# Stands in for {tool}: records its arguments, runs what it would run.
printf '%s\\0' "$@" >> "$LOG/{tool}.args"; echo >> "$LOG/{tool}.args"
{body}
'''


def stand_ins(tmp_path):
  """A PATH folder with sbatch, srun, gcloud and python3 that record their arguments: sbatch
  runs the script, gcloud ssh runs its --command with bash."""
  bin_dir, log = tmp_path / 'bin', tmp_path / 'log'
  bin_dir.mkdir()
  log.mkdir()
  # python3 -m venv DIR makes DIR/bin/python a link to this stand-in.
  bodies = {'sbatch': 'bash "$1"', 'srun': 'true',
            'python3': '[ "$1 $2" = "-m venv" ] && mkdir -p "$3/bin" && ln -s "$0" "$3/bin/python"'
                       '; true',
            'gcloud': '[ "$4" = scp ] && cp "$5" "$HOME/"; '
                      'for a in "$@"; do case $a in describe) echo ACTIVE;; '
                      '--command=*) (cd "$HOME" && bash -c "${a#--command=}");; esac; done'}
  for tool, body in bodies.items():
    (bin_dir / tool).write_text(STAND_IN.format(tool=tool, body=body))
    (bin_dir / tool).chmod(0o755)
  # launch.sh itself runs with this Python ($PYTHON): the stand-in python3 is the VM's.
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'LOG': str(log),
         'HOME': str(tmp_path / 'home'), 'PYTHONPATH': ROOT, 'PYTHON': sys.executable}
  (tmp_path / 'home' / 'cvjax').mkdir(parents=True)
  return env, log


def recorded(log, tool):
  return [line.split('\0') for line in (log / f'{tool}.args').read_text().split('\0\n')
          if line]


def test_injected_values_reach_the_tools_as_data_not_commands(tmp_path):
  env, log = stand_ins(tmp_path)
  evil = '--config.model.name=$(touch PWNED);touch PWNED2'
  work = tmp_path / 'w'
  out = subprocess.run([os.path.join(ROOT, 'launch.sh'), *SLURM, 'configs/resnet.py', str(work),
                        evil], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  srun = recorded(log, 'srun')
  assert srun == [['python', '-m', 'cvjax.main', '--config=configs/resnet.py',
                   f'--workdir={work}', evil]]
  out = subprocess.run([os.path.join(ROOT, 'launch.sh'), *SLURM, '--job_name=a\ntouch PWNED3',
                        'configs/resnet.py', str(work)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2 and len(recorded(log, 'sbatch')) == 1
  # A TPU slice: the ssh command runs through a shell on the VM; the value stays one argument.
  out = subprocess.run([os.path.join(ROOT, 'launch.sh'), *TPU, 'configs/resnet.py', 'gs://b/w',
                        evil], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  runs = [a for a in recorded(log, 'python3') if 'cvjax.main' in a]
  assert runs == [['-m', 'cvjax.main', '--config=configs/resnet.py', '--workdir=gs://b/w',
                   '--distributed=on', evil]]
  for place in (ROOT, tmp_path, tmp_path / 'home', tmp_path / 'home' / 'cvjax'):
    assert not [f for f in os.listdir(place) if f.startswith('PWNED')], place


# --- docs/cluster.md: its commands and what it says a dry run prints ---

def doc_commands(prefix, doc='cluster.md'):
  """The shell commands of a doc's ```sh blocks that start with `prefix`."""
  text = open(os.path.join(ROOT, 'docs', doc)).read()
  blocks = re.findall(r'```sh\n(.*?)```', text, re.S)
  return [shlex.split(l.split('  #')[0]) for b in blocks
          for l in b.replace('\\\n', ' ').splitlines() if l.startswith(prefix)], text


def test_cluster_doc_dry_runs_run_and_print_what_the_doc_shows(dry):
  runs, text = doc_commands('./launch.sh ')
  dry_runs = [argv[1:] for argv in runs if '--dry-run' in argv]
  assert any(a[0] == 'tpu' and any(x.startswith('--parallel') for x in a)
             and '--sweep=experiments/depth_ablation.py' in a for a in dry_runs), dry_runs
  assert any(a[0] == 'slurm' for a in dry_runs)
  printed = {}
  for argv in dry_runs:
    rc, lines, err = dry(*argv)
    assert rc == 0, (argv, err)
    printed[' '.join(argv)] = lines
  # The printed dry run of the one-slice sweep, as the doc shows it.
  shown = re.search(r'The dry run of the one-slice sweep prints.*?```\n(.*?)```', text, re.S)[1]
  one_slice = next(v for k, v in printed.items() if k.startswith('tpu') and '--parallel' not in k)
  tmp = os.path.dirname(commands(one_slice, 'tar')[0][2])
  actual = [l.replace(tmp, '$TMP') for l in one_slice]
  for line in shown.splitlines():
    if '[' in line and 'pip install' in line:  # The abridged install line: its start.
      start = line.split(' [')[0]
      assert any(a.startswith(start) for a in actual), start
    else:
      assert line in actual, line
  # The versions the install table names are those the launcher and requirements.txt use.
  assert f'jax[cuda12]=={launch.JAX_VERSION}' in text and f'jax[tpu]=={launch.JAX_VERSION}' in text
  assert f'jax=={launch.JAX_VERSION}' in open(os.path.join(ROOT, 'requirements.txt')).read()
  assert 'Python 3.11 or newer' in text and launch.MIN_PYTHON == (3, 11)


def test_tpu_launch_leaves_no_code_archive_where_it_ran(tmp_path):
  """Launched from the repository root, the code archive reaches the VM and is then gone:
  nothing new is left in the repository."""
  env, log = stand_ins(tmp_path)
  before = set(os.listdir(ROOT))
  try:
    out = subprocess.run([os.path.join(ROOT, 'launch.sh'), *TPU, 'configs/resnet.py',
                          'gs://b/w'], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    left = set(os.listdir(ROOT)) - before
  finally:
    leftover = os.path.join(ROOT, launch.CODE_ARCHIVE)
    if launch.CODE_ARCHIVE not in before and os.path.exists(leftover):
      os.remove(leftover)
  assert out.returncode == 0, out.stderr
  assert not left, left
  # The copy reached the VM and was unpacked there (the install step then removes it).
  assert (tmp_path / 'home' / 'cvjax' / 'cvjax' / 'main.py').exists()
  scp, = [a for a in recorded(log, 'gcloud') if 'scp' in a]
  assert not os.path.exists(scp[scp.index('scp') + 1])  # The local archive is removed too.


def test_the_accelerator_guides_launches_dry_run(dry):
  """docs/accelerators.md's TPU and Slurm commands, each run as a dry run."""
  runs, _ = doc_commands('./launch.sh ', 'accelerators.md')
  assert sorted(argv[1] for argv in runs) == ['slurm', 'tpu'], runs
  for argv in runs:
    rc, lines, err = dry(*argv[1:], '--dry-run')
    assert rc == 0 and lines, (argv, err)
