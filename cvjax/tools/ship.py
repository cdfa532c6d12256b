"""Makes a finished run shippable (cvjax/shipped.py): its final weights without the optimizer
state, its predictions for every test image, and a config.json that names no local path.

  python -m cvjax.tools.ship --workdir=trained/cifar10_resnet20 \
      [--override=dataset.path=...]   # where the run's data is, if config.json's path is not it

It restores the final checkpoint, evaluates it on the run's test set and refuses to ship
unless that gives results.json's test error exactly; then it writes weights.msgpack,
weights.json, normalization.npz (the training split's input statistics) and
test_predictions.txt (the top-5 classes of every test image, numbered from 1,
in the evaluation's order: `python -m cvjax.evaluate --score` reads it), sets dataset.path
in config.json to '' (the dataset's name stays: a user evaluates on their own copy with
`cvjax.evaluate --data=`), and removes checkpoints/. A run of several sittings carried in the
repository keeps its checkpoints until it finishes (trained/README.md)."""

import json
import shutil
import sys

from cvjax import runtime
from cvjax.errors import UserError


def ship(config, workdir):
  """Ships the finished run in `workdir`; returns (its test error, weights.json's contents)."""
  # pylint: disable-next=g-import-not-at-top
  from cvjax import checkpointing, evaluate, experiment, jit_steps, shipped, train
  from etils import epath  # pylint: disable=g-import-not-at-top
  run_dir = epath.Path(workdir)
  if shipped.is_shipped(workdir):
    raise UserError(f'{workdir} is shipped already ({shipped.WEIGHTS}); nothing to do.')
  try:
    results = json.loads((run_dir / 'results.json').read_text())
  except (OSError, ValueError):
    raise UserError(f'{workdir}/results.json is missing or unreadable: only a finished run '
                    'ships. Finish it first (re-run its training command).') from None
  exp = experiment.build(config)
  if exp.population:
    raise UserError(f'{workdir} holds a population: ship a member\'s own run instead.')
  state = evaluate.restore(exp, workdir)
  step = int(state.step)
  if step != results.get('step') or step != exp.total_steps:
    raise UserError(f'the newest checkpoint in {workdir} is at step {step}; results.json is at '
                    f'step {results.get("step")} and the run has {exp.total_steps} steps: '
                    'only a finished run ships.')
  eval_step, test_data = jit_steps.jit_evaluation(exp)
  metrics, top5, _ = train.evaluate(eval_step, state, test_data, exp.input.eval_batches(),
                                    exp.input.num_test, exp.input.num_classes)
  error = float(metrics['test/error'])
  if error != results['test/error']:
    raise UserError(f'the final checkpoint gives test error {error!r} here, results.json '
                    f'{results["test/error"]!r}: not the run it claims (other data or another '
                    'machine\'s arithmetic?). Nothing was changed.')
  meta = shipped.write(workdir, state, exp.fingerprint, exp.input.class_names)
  shipped.write_normalization(workdir, exp.input.test_data)
  evaluate.write_predictions(str(run_dir / 'test_predictions.txt'), top5)
  saved = json.loads((run_dir / 'config.json').read_text())
  saved['dataset']['path'] = ''
  (run_dir / 'config.json').write_text(json.dumps(saved, indent=2))
  shutil.rmtree(checkpointing.directory(workdir))
  return error, meta


def main(argv):
  runtime.configure()
  from absl import logging  # pylint: disable=g-import-not-at-top
  from cvjax import evaluate  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) > 1:
      raise UserError(f'unexpected argument(s) {" ".join(argv[1:])}: pass --workdir=DIR.')
    if not _WORKDIR.value:
      raise UserError('pass --workdir=DIR, a finished run.')
    config = evaluate.read_run_config(_WORKDIR.value)
    for override in _OVERRIDES.value or ():
      field, _, value = override.partition('=')
      if field not in ('dataset.path', 'dataset.name', 'dataset.data_dir'):
        raise UserError(f'--override={override}: only dataset.path, dataset.name and '
                        'dataset.data_dir can be changed to find the run\'s data.')
      config.dataset[field.split('.')[1]] = value
    error, meta = ship(config, _WORKDIR.value)
  except UserError as e:
    print(f'\ncvjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Shipped {_WORKDIR.value}: step {meta["step"]}, test error {100 * error:.2f}% '
        f'(equal to results.json); wrote weights.msgpack, weights.json, test_predictions.txt; '
        'removed checkpoints/.')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training run.')
  _OVERRIDES = flags.DEFINE_multi_string(
      'override', None, 'FIELD=VALUE for dataset.path, dataset.name or dataset.data_dir, where '
      'the run\'s data is now.')
  app.run(main)
