"""Evaluates a saved checkpoint, trained or imported, and scores prediction files:

  python -m cvjax.evaluate --workdir=DIR                  # the config the run saved
  python -m cvjax.evaluate --workdir=DIR --member=NAME     # one member of a population
  python -m cvjax.evaluate --config=configs/resnet.py:imagenet_resnet50_v1.5 --workdir=DIR \
      --config.dataset.path=... [--predictions=FILE]
  python -m cvjax.evaluate --workdir=trained/cifar10_resnet20 --data=cifar10   # shipped weights
  python -m cvjax.evaluate --score=FILE --labels=FILE

The first two print the test top-1 and top-5 error of the latest checkpoint in DIR and write
its error analysis (WORKDIR/error_analysis/; a population member's in WORKDIR/members/NAME/);
`--data=NAME_OR_PATH` evaluates on other data than the config's: a tfds or shipped name
(`cifar10`, `cifar10_6k`) or a local path (dataset.path), e.g. your own copy of the test set of
a run that ships with cvjax (trained/README.md); its classes must be the run's, in its order.
`--predictions=FILE` also writes the top-5
classes of every test image, the challenge's submission format (never over one of the run's
own records: its metrics, config, results, checkpoints, events or error analysis). `--score` checks such a file
against labels held by someone else, without the model.

Prediction file (the ILSVRC2012 devkit's classification format): one line per test image, in
the order the evaluation reads the test split (for an image folder: sorted by path), five
space-separated class labels, best first, numbered from 1 (label = cvjax class index + 1).
The labels file has one label per line, numbered the same way, as the devkit's
ILSVRC2012_validation_ground_truth.txt. cvjax's class indices follow the sorted class names
(WordNet IDs for ImageNet, as torchvision's); the devkit's ILSVRC2012_IDs (data/meta.mat)
number the synsets in another order, so files for the official server need that mapping.
"""

import contextlib
import json
import os
import signal
import sys

import numpy as np

from cvjax import runtime
from cvjax.errors import UserError

TOP_K = 5
_writing = {'now': False, 'stopped_by': None}  # Whether files are being written; a held signal.


def _stopped(signum, frame=None):
  """Ctrl-C or SIGTERM: one line and exit code 128 + signal at once, or, while the error
  analysis and predictions are being written, as soon as they are complete."""
  del frame
  if _writing['now']:
    _writing['stopped_by'] = signum
    return
  print(f'\ncvjax.evaluate: stopped by {signal.Signals(signum).name}; nothing was written, and '
        'the run\'s checkpoints and records are as they were.', file=sys.stderr, flush=True)
  _exit(128 + signum)


def _exit(code):
  os._exit(code)  # pylint: disable=protected-access  # Whatever JAX or a loader is doing.


@contextlib.contextmanager
def _uninterrupted():
  """Files written inside are finished before a signal stops the command."""
  _writing['now'] = True
  try:
    yield
  finally:
    _writing['now'] = False
    signum, _writing['stopped_by'] = _writing['stopped_by'], None
    if signum is not None:
      print(f'\ncvjax.evaluate: stopped by {signal.Signals(signum).name} after writing its '
            'files.', file=sys.stderr, flush=True)
      _exit(128 + signum)


def restore(exp, workdir):
  """The latest checkpoint in `workdir` for the experiment `exp` (cvjax.experiment)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cvjax import checkpointing, shipped  # pylint: disable=g-import-not-at-top
  if shipped.is_shipped(workdir) and not checkpointing.directory(workdir).is_dir():
    if exp.population:
      raise UserError(f'{workdir} holds shipped weights of one run, not a population.')
    state = jax.device_put(shipped.restore(workdir, exp))
    shipped.normalize_as_trained(workdir, exp.input.test_data)
    return state
  if not checkpointing.directory(workdir).is_dir():
    raise UserError(f'{workdir}/checkpoints does not exist: --workdir must hold a training run '
                    'or an import (python -m cvjax.import_weights).')
  replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  mngr = checkpointing.manager(workdir, exp.config.train.keep_checkpoints)
  state = checkpointing.restore_latest(
      mngr, checkpointing.abstract_with_sharding(exp.abstract_state, replicated), exp.fingerprint,
      read_only=True)  # An evaluation never moves a run's files.
  if state is None:
    raise UserError(f'no checkpoint in {workdir}/checkpoints that restores (see the warnings '
                    'above); nothing was moved.')
  return state


def member_of(exp, state, member, workdir):
  """(the member's own experiment and train state, its folder) from a population's
  checkpoint."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = [m.name for m in exp.members]
  if member not in names:
    raise UserError(f'--member={member!r}: {workdir} holds a population of {len(names)} members: '
                    f'{", ".join(names)}. Pass one of them.')
  for key, g in zip(exp.state_keys, exp.groups):
    for i, m in enumerate(g.members):
      if m.name == member:
        one = dataclasses.replace(exp, config=m.config, model=g.model, schedule=g.schedule,
                                  tx=g.tx, init=g.init, abstract_state=g.abstract_state,
                                  groups=[])
        return one, jax.tree.map(lambda x, i=i: x[i], state[key]), f'{workdir}/members/{member}'


def evaluate_checkpoint(config, workdir, predictions_file=None, member=None):
  """Test metrics of the latest checkpoint (of a population: of `member`); writes the error
  analysis (and predictions)."""
  # pylint: disable-next=g-import-not-at-top
  from cvjax import error_analysis, experiment, jit_steps, metric_writer, train
  exp = experiment.build(config)
  if member is None and exp.population:
    raise UserError(f'{workdir} holds a population of {len(exp.members)} members: pass '
                    f'--member=NAME, one of {", ".join(m.name for m in exp.members)}.')
  if member is not None and not exp.population:
    raise UserError(f'--member={member!r}: {workdir} holds one run, not a population.')
  state = restore(exp, workdir)
  if member is not None:
    exp, state, workdir = member_of(exp, state, member, workdir)
  eval_step, test_data = jit_steps.jit_evaluation(exp)
  metrics, top5, confidence = train.evaluate(eval_step, state, test_data,
                                             exp.input.eval_batches(), exp.input.num_test,
                                             exp.input.num_classes)
  metrics.update(train.evaluate_ema(eval_step, state, test_data, exp.input))
  with _uninterrupted():
    events = metric_writer.EventWriter(workdir)  # Images only: metrics.jsonl stays as it is.
    analysis = error_analysis.write(workdir, exp.input.test_images, exp.input.test_labels,
                                    top5[:, 0], exp.input.class_names, step=int(state.step),
                                    writer=events.tb, confidence=confidence)
    events.close()
    if predictions_file:
      write_predictions(predictions_file, top5)
  return {k: float(v) for k, v in metrics.items()}, analysis


def write_predictions(path, top5):
  """One line per image: its top-5 class indices + 1, best first."""
  with open(path, 'w') as f:
    f.writelines(' '.join(str(int(c) + 1) for c in row) + '\n' for row in np.asarray(top5))


def _read_lines(path, what):
  if not os.path.isfile(path):
    raise UserError(f'the {what} file {path} does not exist.')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f'the {what} file {path} is not text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): '
                    'expected lines of space-separated labels.') from None
  except OSError as e:
    raise UserError(f'cannot read the {what} file {path}: {e.strerror or e}.') from None
  while lines and not lines[-1].strip():
    lines.pop()  # A trailing empty line is not an image.
  if not lines:
    raise UserError(f'the {what} file {path} is empty.')
  return lines


def _labels(tokens, path, line):
  try:
    values = [int(t) for t in tokens]
  except ValueError:
    raise UserError(f'{path}, line {line}: {" ".join(tokens)!r} is not a list of integer '
                    'labels.') from None
  if any(v < 1 for v in values):
    raise UserError(f'{path}, line {line}: labels are numbered from 1, got {values}.')
  return values


def score(predictions_path, labels_path):
  """Top-1 and top-5 error of a predictions file against a labels file (formats above)."""
  labels = [_labels(line.split(), labels_path, i + 1)
            for i, line in enumerate(_read_lines(labels_path, 'labels'))]
  if any(len(l) != 1 for l in labels):
    i = next(i for i, l in enumerate(labels) if len(l) != 1)
    raise UserError(f'{labels_path}, line {i + 1}: expected one label per line, got '
                    f'{len(labels[i])}.')
  predictions = [_labels(line.split(), predictions_path, i + 1)
                 for i, line in enumerate(_read_lines(predictions_path, 'predictions'))]
  if len(predictions) != len(labels):
    raise UserError(f'{predictions_path} has {len(predictions)} lines and {labels_path} '
                    f'{len(labels)}: one line per test image in both, in the same order.')
  for i, p in enumerate(predictions):
    if not 1 <= len(p) <= TOP_K:
      raise UserError(f'{predictions_path}, line {i + 1}: expected 1 to {TOP_K} labels, got '
                      f'{len(p)}.')
  truth = np.array([l[0] for l in labels])
  top1 = np.array([p[0] for p in predictions])
  in_top5 = np.array([t in p for t, p in zip(truth, predictions)])
  return {'count': len(truth), 'top1_error': float(np.mean(top1 != truth)),
          'top5_error': float(np.mean(~in_top5))}


# What a run (or each member of a population, in members/<name>/) owns in its workdir: no
# other command writes over them. Also any TensorBoard event file (events.out.tfevents.*).
RUN_FOLDERS = ('checkpoints', 'bad_checkpoints', 'error_analysis')
RUN_FILES = ('metrics.jsonl', 'config.json', 'config_history.jsonl', 'results.json', 'lock')


def run_record(path, workdir):
  """The part of `workdir` (a run's records) that writing `path` would replace, or None."""
  rel = os.path.relpath(os.path.realpath(path), os.path.realpath(workdir))
  parts = rel.split(os.sep)
  if parts[0] == os.pardir:
    return None
  if parts[0] == 'members' and len(parts) > 2:  # A member's folder is laid out as a run's.
    parts = parts[2:]
  if parts[0] in RUN_FOLDERS or parts[0] == 'members' or (
      len(parts) == 1 and (parts[0] in RUN_FILES or parts[0].startswith('events.out.tfevents'))):
    return rel
  return None


def check_writable(path, workdir=None):
  """Before the evaluation (minutes on ImageNet): can `path` be written, without replacing
  one of the run's own records in `workdir` (its metrics, config, results, checkpoints,
  events, error analysis; a member's too)?"""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f'--predictions={path} is a folder; expected a file name.')
  record = None
  if workdir and '://' not in str(workdir):
    record = run_record(path, workdir)
  if record is not None:
    raise UserError(f'--predictions={path} is {record} of the run in {workdir}: writing the '
                    'predictions there would replace the run\'s own records. Choose another '
                    'file, e.g. predictions.txt beside the run. Nothing was written.')
  if not os.path.isdir(folder):
    raise UserError(f'--predictions={path}: the folder {folder} does not exist.')
  if not os.access(folder, os.W_OK):
    raise UserError(f'--predictions={path}: the folder {folder} is not writable.')


def with_data(config, data):
  """`config` evaluated on `data`: a local path (dataset.path) or a dataset name."""
  config = config.copy_and_resolve_references()
  if os.path.exists(os.path.expanduser(data)):
    config.dataset.path = data
  elif os.sep in data or data.endswith(('.tar.gz', '.tgz', '.tar')):
    raise UserError(f'--data={data}: no such file or folder.')
  else:
    config.dataset.name, config.dataset.path = data, ''
  return config


def read_run_config(workdir):
  """The config a run saved in WORKDIR/config.json, with the fields an older cvjax did not
  write at their defaults (configs.common.complete)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise UserError(f'{path} not found: pass --config, or a --workdir written by cvjax.')
  try:
    values = json.loads(path.read_text())
    if not isinstance(values, dict):
      raise ValueError(f'it holds a {type(values).__name__}, not an object')
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not a config cvjax wrote ({type(e).__name__}: '
                    f'{str(e)[:200]}); pass the run\'s --config instead.') from None
  return common.complete(values)


def main(argv):
  runtime.configure()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO.
  try:
    if len(argv) > 1:
      raise UserError(f'unexpected argument(s) {" ".join(argv[1:])}: every option is a flag '
                      'written --name=value.')
    if _SCORE.value or _LABELS.value:
      if not (_SCORE.value and _LABELS.value) or _WORKDIR.value:
        raise UserError('scoring takes --score=PREDICTIONS --labels=LABELS and nothing else.')
      result = score(_SCORE.value, _LABELS.value)
      print(f'{result["count"]} images: top-1 error {100 * result["top1_error"]:.2f}%, '
            f'top-5 error {100 * result["top5_error"]:.2f}%')
      return
    if not _WORKDIR.value:
      raise UserError('pass --workdir=DIR (a run or an import) to evaluate, or --score=FILE '
                      '--labels=FILE to score predictions.')
    if _PREDICTIONS.value:
      check_writable(_PREDICTIONS.value, _WORKDIR.value)
    config = _CONFIG.value
    if config is None:
      config = read_run_config(_WORKDIR.value)
    if _DATA.value:
      config = with_data(config, _DATA.value)
    metrics, analysis = evaluate_checkpoint(config, _WORKDIR.value, _PREDICTIONS.value,
                                            _MEMBER.value)
  except UserError as e:
    print(f'\ncvjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  top5 = (f', top-5 error {100 * metrics["test/top5_error"]:.2f}%'
          if 'test/top5_error' in metrics else '')
  print(f'step {analysis["step"]}: {analysis["num_mistakes"]} of {analysis["num_test"]} test '
        f'images misclassified (top-1 error {100 * metrics["test/error"]:.2f}%{top5}); wrote '
        f'{_WORKDIR.value}{"/members/" + _MEMBER.value if _MEMBER.value else ""}/error_analysis/'
        + (f' and {_PREDICTIONS.value}' if _PREDICTIONS.value else '')
        + (f'; the moving average of the weights: top-1 error '
           f'{100 * metrics["test/ema_error"]:.2f}%' if 'test/ema_error' in metrics else ''))


if __name__ == '__main__':
  for _s in (signal.SIGINT, signal.SIGTERM):  # Before the flags load the config and JAX.
    signal.signal(_s, _stopped)
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'The run\'s config (default: WORKDIR/config.json).', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A training run or an import.')
  _PREDICTIONS = flags.DEFINE_string('predictions', None,
                                     'Also write the top-5 classes per test image here.')
  _MEMBER = flags.DEFINE_string('member', None, 'A population\'s member to evaluate.')
  _DATA = flags.DEFINE_string('data', None, 'Evaluate on this dataset instead of the config\'s: '
                              'a name (cifar10, mnist10k, ...) or a local path.')
  _SCORE = flags.DEFINE_string('score', None, 'A predictions file to score against --labels.')
  _LABELS = flags.DEFINE_string('labels', None, 'The true labels, one per line, from 1.')
  app.run(main)
