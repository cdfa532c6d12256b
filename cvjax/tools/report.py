"""Figures and tables from a sweep directory, or from one run:

  python -m cvjax.tools.report DIR

reads every run under DIR: DIR/<trial>/{metrics.jsonl, config.json, results.json}, the members
of population trials (DIR/<trial>/members/<member>/..., finished when DIR/<trial>/results.json
exists), or DIR's own files for a single run or population. Runs whose configs differ only by
the seed are one net, reported over its seeds (mean ± sample std, n-1). Writes DIR/report/:
  figure6.png       training error (dashed) and test error (solid) against iterations, plain
                    nets left, ResNets right, one colour per depth (He et al. 2015, Figure 6):
                    each net's mean over its seeds, with a band from the lowest to the
                    highest seed's test error;
  table6.md         per net: parameters, test error mean ± std, best, seeds, beside the paper's
                    Table 6 and a 5-seed reproduction of its recipe;
  nets.md           every net (any model) over its seeds, with the run of the median seed,
                    where some net has several;
  epochs.md         test error of every net at a few epochs of its run, mean ± std;
  leaderboard.md    every run (population members too) ranked by final test error;
  grad_norms.png/md gradient norm against layer index (log scale), one line per net (mean,
                    band min to max over seeds), and the first-to-last-layer ratio (for runs
                    that logged grad_norm/*);
  README.md         all of the above on one page.
"""

import collections
import json
import sys

from etils import epath
import numpy as np

from cvjax import workdir
from cvjax.errors import UserError

# He et al. 2015, Table 6: CIFAR-10 test error (%) of the ResNets; 110 is the best of 5 runs
# (their mean ± std: 6.61 ± 0.16). The paper gives no numbers for the plain nets (Figure 6 only).
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_NOTE = {110: '6.43 (best of 5; 6.61 ± 0.16)'}
# The paper's recipe rerun with 5 seeds (github.com/nabla0001/resnet, README): test error (%),
# mean ± std; keyed by (residual, depth).
REPRODUCTION = {(True, 20): (8.51, 0.22), (True, 56): (7.40, 0.27), (True, 110): (7.14, 0.20),
                (False, 20): (9.78, 0.13), (False, 56): (12.95, 0.22)}


def _read_text(path):
  """The text of a run's file; a file that cannot be read as text is a UserError naming it."""
  try:
    return path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    why = (f'not UTF-8 text ({e.reason} at byte {e.start})' if isinstance(e, UnicodeDecodeError)
           else e.strerror or str(e))
    raise UserError(f'cannot read {path}: {why}. A run writes it as JSON text; restore the file '
                    'or move the run out of the folder, and re-run the report.') from None


def _parse(text, path, line=None, kind=dict):
  """One JSON value of a run's file, which must be a `kind`."""
  where = f'{path}, line {line}' if line else str(path)
  try:
    value = json.loads(text)
  except ValueError as e:
    raise UserError(f'{where} is not valid JSON ({e}). A run writes it as JSON; restore the '
                    'file or move the run out of the folder, and re-run the report.') from None
  if not isinstance(value, kind):
    raise UserError(f'{where} holds a JSON {type(value).__name__}, expected an object; restore '
                    'the file or move the run out of the folder, and re-run the report.')
  return value


def _read_json(path):
  return _parse(_read_text(path), path) if path.exists() else None


def _run(path, name, trial, results):
  metrics = path / 'metrics.jsonl'
  records = [_parse(line, metrics, i) for i, line in
             enumerate(_read_text(metrics).splitlines(), 1) if line.strip()]
  return {'name': name, 'trial': trial, 'records': records,
          'config': _parse(_read_text(path / 'config.json'), path / 'config.json'),
          'results': results}


def _population(path, trial):
  """The members of population folder `path` that logged anything; finished (with their
  results) only once the population's results.json, written last, exists."""
  done = _read_json(path / 'results.json')
  runs = []
  for member in sorted((path / 'members').iterdir()):
    if not (member / 'metrics.jsonl').exists():
      continue
    results = None
    if done is not None:
      results = done.get('members', {}).get(member.name) or _read_json(member / 'results.json')
    runs.append(_run(member, f'{trial}/{member.name}', trial, results))
  return runs


EXPECTED = ('Expected a run (a workdir with metrics.jsonl), a population (a workdir with '
            'members/) or a sweep (subfolders with one of these each).')


def load_runs(sweep_dir):
  """The runs of a local or remote (gs://...) sweep directory (its trials, and the members of
  its population trials), or of the one run or population that `sweep_dir` is."""
  root = epath.Path(sweep_dir)
  if not root.exists():
    raise UserError(f'{sweep_dir} does not exist. {EXPECTED}')
  if not root.is_dir():
    raise UserError(f'{sweep_dir} is a file, not a folder. {EXPECTED}')
  if (root / 'members').exists():
    return _population(root, root.name)
  if (root / 'metrics.jsonl').exists():
    return [_run(root, root.name, root.name, _read_json(root / 'results.json'))]
  runs = []
  for path in sorted(root.iterdir()):
    if (path / 'members').exists():
      runs += _population(path, path.name)
    elif (path / 'metrics.jsonl').exists():
      runs.append(_run(path, path.name, path.name, _read_json(path / 'results.json')))
  return runs


def series(run, tag):
  points = [(r['step'], r[tag]) for r in run['records'] if tag in r]
  return np.array(points).T if points else np.zeros((2, 0))


def last(run, tag):
  s = series(run, tag)
  return float(s[1, -1]) if s.shape[1] else None


def final(run, tag):
  """A finished run's result, else the last value it logged."""
  value = (run['results'] or {}).get(tag)
  return float(value) if value is not None else last(run, tag)


# --- Nets: runs that differ only by their seed ---

def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def net_key(config):
  """What makes two runs the same net: the config without `seed` and `population` (a member's
  config is its own resolved one, with a population of one)."""
  return json.dumps({k: v for k, v in config.items() if k not in ('seed', 'population')},
                    sort_keys=True)


def net_name(model):
  """'ResNet-20', 'plain-20' (the paper's names), with the activation when it is not ReLU."""
  if model['name'] == 'resnet_cifar':
    name = f'{"ResNet" if model.get("residual", True) else "plain"}-{model["depth"]}'
  else:
    name = f'{model["name"]}{model.get("depth", "")}'
  activation = model.get('activation', 'relu')
  return name if activation == 'relu' else f'{name}, {activation}'


def group_nets(runs):
  """[{'label', 'config', 'runs'}], one per net, its runs in seed order. Nets that would share
  a name get the config fields they differ in added to it."""
  groups = collections.defaultdict(list)
  for run in runs:
    groups[net_key(run['config'])].append(run)
  nets = [{'label': net_name(rs[0]['config']['model']), 'config': rs[0]['config'],
           'runs': sorted(rs, key=lambda r: (r['config'].get('seed', 0), r['name']))}
          for rs in groups.values()]
  by_label = collections.defaultdict(list)
  for net in nets:
    by_label[net['label']].append(net)
  for same in by_label.values():
    if len(same) < 2:
      continue
    flat = [_flatten({k: v for k, v in n['config'].items() if k not in ('seed', 'population')})
            for n in same]
    differ = sorted(k for k in set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
    for net, f in zip(same, flat):
      shown = ', '.join(f'{k}={f.get(k)}' for k in differ[:3])
      shown += ', ...' if len(differ) > 3 else ''
      net['label'] = f'{net["label"]} ({shown})'
  return sorted(nets, key=lambda n: (n['config']['model'].get('residual', True),
                                     n['config']['model'].get('depth', 0), n['label']))


def finished_runs(net):
  """The runs a net's numbers come from: its finished ones, or all while none has finished."""
  return [r for r in net['runs'] if r['results']] or net['runs']


def stats(values):
  """(mean, sample std or None for one value, min, n) of the values that are not None."""
  v = np.array([x for x in values if x is not None], dtype=float)
  if not len(v):
    return None
  return v.mean(), (v.std(ddof=1) if len(v) > 1 else None), v.min(), len(v)


def _pct(x):
  return '-' if x is None else f'{100 * x:.2f}'


def _pct_pm(values):
  """'8.51 ± 0.22' over seeds, '8.51' for one (a single run reads as before)."""
  s = stats(values)
  if s is None:
    return '-'
  mean, std, _, _ = s
  return f'{100 * mean:.2f}' if std is None else f'{100 * mean:.2f} ± {100 * std:.2f}'


def _steps(net):
  done = [r['results']['step'] for r in net['runs'] if r['results']]
  unfinished = len(net['runs']) - len(done)
  if not done:
    return '(unfinished)'
  steps = f'{min(done)}' if min(done) == max(done) else f'{min(done)}-{max(done)}'
  return steps if not unfinished else f'{steps} ({unfinished} of {len(net["runs"])} unfinished)'


def duplicate_seeds(nets):
  """Notes on nets where one seed ran twice (e.g. a single run and a population member): both
  are in the numbers, and they are not independent seeds."""
  notes = []
  for net in nets:
    seeds = collections.defaultdict(list)
    for r in net['runs']:
      seeds[r['config'].get('seed', 0)].append(r['name'])
    for seed, names in sorted(seeds.items()):
      if len(names) > 1:
        notes.append(f'{net["label"]}: seed {seed} ran {len(names)} times ({", ".join(names)}); '
                     'each counts in its statistics.')
  return notes


# --- Figure 6 and Table 6 ---

def _figure(**kwargs):
  """A figure drawn by Agg outside pyplot (the caller's backend stays), and its axes."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=kwargs.pop('figsize'))
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(**kwargs)


def _is_cifar_resnet(config):
  """The paper's CIFAR nets (BatchNorm, ReLU): what Figure 6 and Table 6 compare."""
  m = config['model']
  return (m['name'] == 'resnet_cifar' and m.get('batch_norm', True)
          and m.get('activation') == 'relu')


def curve(runs, tag):
  """(steps, mean, min, max) over the runs that logged `tag` at each step."""
  at = collections.defaultdict(list)
  for run in runs:
    for step, value in zip(*series(run, tag)):
      at[int(step)].append(value)
  steps = sorted(at)
  values = [np.array(at[s]) for s in steps]
  return (np.array(steps), np.array([v.mean() for v in values]),
          np.array([v.min() for v in values]), np.array([v.max() for v in values]))


def figure6(nets, path):
  """Plain nets left, ResNets right; dashed: training error, solid: test error; the mean over
  seeds, with the band from the lowest to the highest seed's test error. A net evaluated once
  (train.eval_every_steps = the run's length) has no test curve: its test error is a dot at
  that step (a bar from the lowest to the highest seed), and the legend and the returned notes
  say so. Returns None when no net is a CIFAR ResNet or plain net, else the notes."""
  nets = [n for n in nets if _is_cifar_resnet(n['config'])]
  if not nets:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  depths = sorted({n['config']['model']['depth'] for n in nets})
  colours = dict(zip(depths, matplotlib.colormaps['viridis'](np.linspace(0, 0.9, len(depths)))))
  seeded = any(len(n['runs']) > 1 for n in nets)
  fig, axes = _figure(nrows=1, ncols=2, figsize=(11, 4.2), sharey=True)
  top, once, untested, curves = 0, [], [], False
  for ax, residual in zip(axes, (False, True)):
    for net in nets:
      m = net['config']['model']
      if m['residual'] != residual:
        continue
      n = len(net['runs'])
      label = net['label'] + (f' ({n} seeds)' if n > 1 else '')
      for tag, style in (('train/error', '--'), ('test/error', '-')):
        x, mean, low, high = curve(net['runs'], tag)
        if not len(x):
          if tag == 'test/error':
            untested.append(net['label'])
          continue
        if tag == 'test/error' and len(x) == 1:  # One point: a line would draw nothing.
          once.append(f'{net["label"]} (step {int(x[0]):,})')
          ax.errorbar(x, 100 * mean, yerr=[100 * (mean - low), 100 * (high - mean)], fmt='o',
                      color=colours[m['depth']], capsize=3, markersize=5,
                      label=f'{label}: test once')
        else:
          ax.plot(x, 100 * mean, style, color=colours[m['depth']],
                  label=label if tag == 'test/error' else None, linewidth=1.4)
          curves |= tag == 'test/error'
          if tag == 'test/error' and n > 1:
            ax.fill_between(x, 100 * low, 100 * high, color=colours[m['depth']], alpha=0.2,
                            linewidth=0)
        later = x >= 0.1 * x.max()  # The first tenth of a run would squash the rest.
        top = max(top, 100 * high[later].max())
    ax.set_title('ResNets' if residual else 'plain networks')
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(title=', '.join(['solid: test'] * curves + ['dashed: train']
                                + ['dot: the one test evaluation'] * bool(once)),
                fontsize=8, title_fontsize=8)
    else:  # E.g. the report of a single run.
      ax.text(0.5, 0.5, f'no {"ResNets" if residual else "plain nets"} among these runs',
              ha='center', va='center', transform=ax.transAxes, color='grey')
  axes[0].set_ylabel('error (%)')
  axes[0].set_ylim(0, min(100, top * 1.05) or 100)
  notes = []
  if once:
    notes.append(f'Evaluated once, so no test curve (a dot at that step): {", ".join(once)}; '
                 'set train.eval_every_steps to see the test error as it trains.')
  if untested:
    notes.append(f'No test error logged (not drawn): {", ".join(untested)}.')
  fig.suptitle('CIFAR-10: training (dashed) and test (' + ('solid' if curves else '')
               + (', ' if curves and once else '') + ('dot: evaluated once' if once else '')
               + ') error' + ('; mean over seeds, band: min to max test error of the seeds'
                              if seeded else ''), fontsize=10)
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  return notes


def table6(nets):
  rows = ['| method | depth | parameters | test error (%) | best (%) | seeds | paper (%) | '
          '5-seed reproduction (%) | train error (%) | steps |',
          '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for net in [n for n in nets if _is_cifar_resnet(n['config'])]:
    m, runs = net['config']['model'], finished_runs(net)
    depth, residual = m['depth'], m['residual']
    params = next((f'{r["results"]["num_params"]:,}' for r in runs
                   if (r['results'] or {}).get('num_params')), '-')
    test = [final(r, 'test/error') for r in runs]
    s = stats(test)
    best = _pct(s[2]) if s and s[3] > 1 else '-'
    paper = PAPER_NOTE.get(depth, PAPER_TEST_ERROR.get(depth, '-')) if residual else '-'
    repro = REPRODUCTION.get((residual, depth))
    repro = '-' if repro is None else '%.2f ± %.2f' % repro
    method = ('ResNet' if residual else 'plain') + net['label'][len(net_name(m)):]
    rows.append(f'| {method} | {depth} | {params} | {_pct_pm(test)} | {best} | '
                f'{len(net["runs"])} | {paper} | {repro} | '
                f'{_pct_pm([final(r, "train/error") for r in runs])} | {_steps(net)} |')
  return '\n'.join(rows)


# --- Error against epochs ---

def steps_per_epoch(net):
  """From the config and what the runs logged: a finished run of train.num_epochs >= 1 took
  ceil(num_epochs * per_epoch) steps; with train.eval_every_steps=0 the first evaluation is at
  the end of epoch 1. None when neither says (train.num_steps and a custom eval schedule)."""
  t = net['config']['train']
  for run in net['runs']:
    if run['results'] and not t.get('num_steps') and (t.get('num_epochs') or 0) >= 1:
      return int(run['results']['step'] // t['num_epochs'])
  if not t.get('eval_every_steps'):
    for run in net['runs']:
      steps = series(run, 'test/error')[0]
      if len(steps) >= 2:
        return int(steps[0])
  return None


def _at(run, tag, step, tolerance):
  """The value logged nearest `step`, if within `tolerance` steps."""
  x, y = series(run, tag)
  if not len(x):
    return None
  i = int(np.argmin(np.abs(x - step)))
  return float(y[i]) if abs(x[i] - step) <= tolerance else None


def _points(end):
  """A few epochs of a run of `end` epochs: 1, a quarter, half, three quarters, the end."""
  return {p for p in (1, round(end / 4), round(end / 2), round(3 * end / 4)) if 1 <= p < end} | {
      round(end, 2)}


def _eval_points(steps):
  """Up to 5 of a run's evaluation steps, evenly spread, the last included."""
  steps = sorted(steps)
  return {steps[int(i)] for i in np.round(np.linspace(0, len(steps) - 1, min(5, len(steps))))}


def epochs_table(nets):
  """Test error of every net at a few epochs of its run, mean ± std over its seeds (at a few
  of its evaluation steps where some net's epoch length is unknown)."""
  per_epoch = {id(n): steps_per_epoch(n) for n in nets}
  unit = 'epoch' if all(per_epoch.values()) else 'step'
  columns = set()
  for net in nets:
    steps = {int(s) for r in net['runs'] for s in series(r, 'test/error')[0]}
    if steps and unit == 'epoch':
      columns |= _points(max(steps) / per_epoch[id(net)])
    elif steps:
      columns |= _eval_points(steps)
  if not columns:
    return None
  columns = sorted(columns)
  rows = ['| net | seeds | ' + ' | '.join(f'{unit} {c:g}' for c in columns) + ' |',
          '|---|---:|' + '---:|' * len(columns)]
  for net in nets:
    scale = per_epoch[id(net)] if unit == 'epoch' else 1
    # An evaluation within 5% of an epoch: the end of a run of N.5 epochs, say, not the next.
    cells = [_pct_pm([_at(r, 'test/error', c * scale, max(1, 0.05 * scale)) for r in net['runs']])
             for c in columns]
    rows.append(f'| {net["label"]} | {len(net["runs"])} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def median_run(runs):
  """The run with the median final test error (the lower one of an even count): the one whose
  error_analysis/ shows a typical seed's mistakes."""
  ranked = sorted((r for r in runs if final(r, 'test/error') is not None),
                  key=lambda r: final(r, 'test/error'))
  return ranked[(len(ranked) - 1) // 2] if ranked else None


def nets_table(nets):
  """Every net (any model) over its seeds: the numbers of Table 6 without the paper's."""
  rows = ['| net | seeds | test error (%) | best (%) | train error (%) | median seed | steps |',
          '|---|---:|---:|---:|---:|---|---:|']
  for net in nets:
    runs = finished_runs(net)
    test = [final(r, 'test/error') for r in runs]
    s = stats(test)
    median = median_run(runs)
    rows.append(f'| {net["label"]} | {len(net["runs"])} | {_pct_pm(test)} | '
                f'{_pct(s[2]) if s and s[3] > 1 else "-"} | '
                f'{_pct_pm([final(r, "train/error") for r in runs])} | '
                f'{median["name"] if median else "-"} | {_steps(net)} |')
  return '\n'.join(rows)


def leaderboard(runs):
  ranked = sorted(runs, key=lambda r: (final(r, 'test/error') is None,
                                       final(r, 'test/error') or 0))
  rows = ['| rank | run | net | seed | test error (%) | top-5 error (%) | train error (%) | '
          'steps | status |', '|---:|---|---|---:|---:|---:|---:|---:|---|']
  for i, r in enumerate(ranked, 1):
    steps = max([x['step'] for x in r['records']], default=0)
    rows.append(f'| {i} | {r["name"]} | {net_name(r["config"]["model"])} | '
                f'{r["config"].get("seed", "-")} | {_pct(final(r, "test/error"))} | '
                f'{_pct(final(r, "test/top5_error"))} | {_pct(final(r, "train/error"))} | '
                f'{steps} | {"finished" if r["results"] else "unfinished"} |')
  return '\n'.join(rows)


# --- Gradient norms ---

def first_grad_norms(run):
  """Per-layer gradient norms at the first logged step, in forward order (the order results.json
  records; before a run has finished, by name)."""
  records = [r for r in run['records'] if any(k.startswith('grad_norm/') for k in r)]
  if not records:
    return None
  first = records[0]
  order = (run['results'] or {}).get('layer_order') or sorted(
      k[len('grad_norm/'):] for k in first if k.startswith('grad_norm/'))
  return np.array([first[f'grad_norm/{layer}'] for layer in order
                   if f'grad_norm/{layer}' in first])


def _spread(values):
  """'0.188' for one seed, '0.188 (0.15-0.21)' (mean, min-max) for several."""
  v = np.asarray(values, dtype=float)
  return f'{v[0]:.3g}' if len(v) == 1 else f'{v.mean():.3g} ({v.min():.3g}-{v.max():.3g})'


def grad_norm_report(nets, path):
  with_norms = []
  for net in nets:
    norms = [first_grad_norms(r) for r in net['runs']]
    norms = [n for n in norms if n is not None and len(n)]
    if norms and len({len(n) for n in norms}) == 1:
      with_norms.append((net, np.stack(norms)))
  if not with_norms:
    return None
  depths = sorted({n['config']['model']['depth'] for n, _ in with_norms})
  fig, axes = _figure(nrows=1, ncols=len(depths), figsize=(4.5 * len(depths), 3.8),
                      squeeze=False)
  rows = ['| trial | net | activation | depth | seeds | first-layer grad norm | '
          'last-layer grad norm | first / last |', '|---|---|---|---:|---:|---:|---:|---:|']
  for ax, depth in zip(axes[0], depths):
    for net, norms in with_norms:
      m = net['config']['model']
      if m['depth'] != depth:
        continue
      layers = np.arange(1, norms.shape[1] + 1)
      label = net['label'] if m['activation'] in net['label'] else (
          f'{net["label"]}, {m["activation"]}')
      # A norm that underflowed to 0 (sigmoid's first layers) has no place on a log axis.
      positive = lambda v: np.where(v > 0, v, np.nan)
      line, = ax.semilogy(layers, positive(norms.mean(0)), marker='.', label=label + (
          f' ({len(norms)} seeds)' if len(norms) > 1 else ''))
      if len(norms) > 1:
        ax.fill_between(layers, positive(norms.min(0)), positive(norms.max(0)),
                        color=line.get_color(), alpha=0.2, linewidth=0)
      with np.errstate(divide='ignore', invalid='ignore'):
        ratio = norms[:, 0] / norms[:, -1]
      trials = ', '.join(sorted({r['trial'] for r in net['runs']}))
      rows.append(f'| {trials} | {net["label"]} | {m["activation"]} | {depth} | {len(norms)} | '
                  f'{_spread(norms[:, 0])} | {_spread(norms[:, -1])} | {_spread(ratio)} |')
    ax.set_title(f'depth {depth}: gradient norm per layer at step 0')
    ax.set_xlabel('layer index (1 = first conv)')
    ax.set_ylabel('gradient norm (log scale)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  if any(len(n) > 1 for _, n in with_norms):
    fig.suptitle('mean over seeds; band: min to max of the seeds', fontsize=9)
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  return '\n'.join(rows)


def write_report(sweep_dir):
  runs = load_runs(sweep_dir)
  if not runs:
    raise UserError(f'no runs in {sweep_dir}. {EXPECTED}')
  nets = group_nets(runs)
  out = epath.Path(sweep_dir) / 'report'
  out.mkdir(parents=True, exist_ok=True)
  page = [f'# Report: {workdir.as_path(sweep_dir).name}', '']
  notes = duplicate_seeds(nets)
  if notes:
    page += ['Note: ' + ' '.join(notes), '']
  figure_notes = figure6(nets, out / 'figure6.png')
  if figure_notes is not None:
    table = table6(nets)
    (out / 'table6.md').write_text(table + '\n')
    page += ['![Figure 6](figure6.png)', '', *[f'Note: {n}' for n in figure_notes],
             *[''] * bool(figure_notes), '## Table 6', '', table, '',
             'Test error: mean ± sample standard deviation over the seeds (one seed: its '
             'value); best: the lowest seed. Paper: He et al. 2015, Table 6 (ResNets only; '
             'ResNet-110 as the best of 5 runs, and their mean ± std). 5-seed reproduction: '
             'the paper\'s recipe rerun in PyTorch, 5 seeds, mean ± std (github.com/nabla0001/'
             'resnet).', '']
  if any(len(n['runs']) > 1 for n in nets):
    table = nets_table(nets)
    (out / 'nets.md').write_text(table + '\n')
    page += ['## Nets over seeds', '', table, '',
             'Median seed: the run with the median test error (of an even number, the lower); '
             'its error_analysis/ shows a typical seed\'s mistakes.', '']
  epochs = epochs_table(nets)
  if epochs:
    (out / 'epochs.md').write_text(epochs + '\n')
    page += ['## Test error against epochs', '', epochs, '']
  board = leaderboard(runs)
  (out / 'leaderboard.md').write_text(board + '\n')
  page += ['## Leaderboard', '', board, '']
  norms = grad_norm_report(nets, out / 'grad_norms.png')
  if norms:
    (out / 'grad_norms.md').write_text(norms + '\n')
    page += ['## Gradient norms', '', '![gradient norms](grad_norms.png)', '', norms, '']
  (out / 'README.md').write_text('\n'.join(page))
  return out


USAGE = 'usage: python -m cvjax.tools.report SWEEP_DIR|RUN_DIR'


def main(argv):
  if any(a in ('-h', '--help', '-?', '--helpfull') for a in argv[1:]):
    print(f'{__doc__.strip()}\n\n{USAGE}')
    return 0
  if len(argv) != 2 or argv[1].startswith('-'):
    print(f'cvjax.tools.report: error: expected one folder, got {argv[1:]}.\n{USAGE}',
          file=sys.stderr)
    return 2
  try:
    print(f'wrote {write_report(argv[1])}')
  except UserError as e:
    print(f'cvjax.tools.report: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
