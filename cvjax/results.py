"""What a finished run leaves beside its metrics (cvjax/metric_writer.py): results.json, the
error analysis and TensorBoard's HParams; and the line that ends the training log."""

import json

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import numpy as np

from cvjax import error_analysis
from cvjax import population
from cvjax.ops import convolution


def hparams(config):
  """The config's scalar fields, flattened, for TensorBoard's HParams dashboard."""
  flat = {}
  for section, value in config.items():
    items = value.items() if hasattr(value, 'items') else [('', value)]
    for key, v in items:
      if isinstance(v, (bool, int, float, str)):
        flat[f'{section}.{key}' if key else section] = v
  return flat


def layer_order(model, variables, x):
  """Paths of the conv and dense layers in the order the forward pass calls them."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (nn.Conv, nn.Dense)):
      order.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  return order


def write(workdir, exp, step, test_metrics, predictions, confidence, writers):
  """End of a run: error analysis, HParams, and results.json (which marks the run done); a
  population's for each member, then its own results.json with every member's and their mean
  and standard deviation. Returns what results.json holds."""
  dirs = exp.member_dirs(workdir)
  tests = exp.by_member({k: np.asarray(v) for k, v in test_metrics.items()})
  preds, conf = exp.by_member(predictions), exp.by_member(confidence)
  results = {}
  net_of = {n: label for label, names in exp.nets().items() for n in names}
  for name, (config, g) in exp.member_configs().items():
    writer = writers[name]
    analysis = error_analysis.write(dirs[name], exp.input.test_images, exp.input.test_labels,
                                    preds[name][:, 0], exp.input.class_names, step=step,
                                    writer=writer.tb, confidence=conf[name])
    final = {k: float(v) for k, v in tests[name].items()}
    train_records = [r for r in writer.records() if 'train/error' in r]
    if train_records:
      final['train/error'] = train_records[-1]['train/error']
      final['train/loss'] = train_records[-1]['train/loss']
    # A member's net (its group) as a column, so the HParams dashboard groups its seeds.
    writer.write_hparams({**hparams(config), **({'population.group': net_of[name]}
                                                if name in net_of else {})}, final)
    example = jax.ShapeDtypeStruct((1, *exp.input.image_shape),
                                   convolution.compute_dtype(config))
    variables = {'params': g.abstract_state.params, **g.abstract_state.model_state}
    results[name] = {'step': step, **final, 'num_mistakes': analysis['num_mistakes'],
                     'num_params': int(sum(p.size for p in jax.tree.leaves(
                         g.abstract_state.params))),
                     'layer_order': layer_order(g.model, variables, example)}
    (dirs[name] / 'results.json').write_text(json.dumps(results[name], indent=1))
  if not exp.population:
    return results[None]
  out = {'step': step, 'members': results, 'groups': group_results(results, exp.nets())}
  (epath.Path(workdir) / 'results.json').write_text(json.dumps(out, indent=1))
  return out


def group_results(results, nets):
  """{net: {members, mean, std}}: each group of a population (its config without the seed)
  over its seeds; a mean over different nets would mean nothing."""
  out = {}
  for label, names in nets.items():
    keys = [k for k in results[names[0]] if k.startswith(('test/', 'train/'))]
    stats = {k: population.mean_std([results[n][k] for n in names]) for k in keys}
    out[label] = {'members': names, 'mean': {k: float(m) for k, (m, _) in stats.items()},
                  'std': {k: float(s) for k, (_, s) in stats.items()}}
  return out


def read_finished(workdir, exp, step):
  """The final test metrics of a run that finished at `step` (its results.json), after saying
  so; None when it still has to be evaluated and written (then the caller does that)."""
  results_file = epath.Path(workdir) / 'results.json'
  try:
    results = json.loads(results_file.read_text()) if results_file.exists() else None
  except (OSError, ValueError):
    results = None
  needed = {'test/error', 'test/count', 'num_mistakes'}
  if (jax.process_count() > 1 or not results or results.get('step') != step
      or not (set(results.get('members', {})) == {m.name for m in exp.members} and all(
          needed <= set(r) for r in results['members'].values()) if exp.population
              else needed <= set(results))):
    return None  # Several processes evaluate together; a missing results.json is rewritten.
  logging.info('%s Nothing to train (this config runs %d steps): re-evaluate with `python -m '
               'cvjax.evaluate --workdir=%s`, or train longer with a larger train.num_epochs.',
               summary_line(results, workdir, f'This run already finished at step {step}'),
               exp.total_steps, workdir)
  tests = lambda r: {k: float(v) for k, v in r.items() if k.startswith('test/')}
  if exp.population:
    return {name: tests(r) for name, r in results['members'].items()}
  return tests(results)


def summary_line(results, workdir, head):
  """One readable line for the end of a run: `head`, how well it did, what it wrote."""
  if 'members' in results:
    groups = results.get('groups') or group_results(
        results['members'], population.by_group(results['members']))  # Older results.json.
    nets = '; '.join(
        (f'{label}: ' if len(groups) > 1 else '') + f'{100 * g["mean"]["test/error"]:.2f} ± '
        f'{100 * g["std"]["test/error"]:.2f}% ({len(g["members"])} seed'
        f'{"s" if len(g["members"]) > 1 else ""})' for label, g in groups.items())
    return (f'{head}: test error {nets}. Wrote {workdir}/results.json (each net\'s mean and '
            f'std over its seeds) and each member\'s results, error analysis and curves in '
            f'{workdir}/members/; `tensorboard --logdir {workdir}` overlays them.')
  top5 = (f', top-5 {100 * results["test/top5_error"]:.2f}%'
          if 'test/top5_error' in results else '')
  train = (f'; train error {100 * results["train/error"]:.2f}% over the last log interval'
           if 'train/error' in results else '')
  return (f'{head}: test error {100 * results["test/error"]:.2f}% ({results["num_mistakes"]} of '
          f'{int(results["test/count"])}){top5}{train}. Wrote {workdir}/results.json and '
          f'{workdir}/error_analysis/; `tensorboard --logdir {workdir}` shows the curves.')
