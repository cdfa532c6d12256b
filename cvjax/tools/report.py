"""Figures and tables from a sweep directory, or from one run:

  python -m cvjax.tools.report DIR

reads DIR/<trial>/{metrics.jsonl, config.json, results.json} (or DIR's own, for a single run)
and writes DIR/report/:
  figure6.png       training error (dashed) and test error (solid) against iterations, plain
                    nets left, ResNets right, one colour per depth (He et al. 2015, Figure 6);
  table6.md         depth, parameters, our test error and the paper's (Table 6);
  leaderboard.md    every trial ranked by final test error;
  grad_norms.png/md gradient norm against layer index (log scale), one line per net,
                    and the first-to-last-layer ratio (for trials that logged grad_norm/*);
  README.md         all of the above on one page.
"""

import json
import sys

from etils import epath
import numpy as np

# He et al. 2015, Table 6: CIFAR-10 test error (%) of the ResNets (best of 5 runs for 110).
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


def load_trials(sweep_dir):
  """The trials of a local or remote (gs://...) sweep directory, or the one run that
  `sweep_dir` is (a workdir with its own metrics.jsonl)."""
  trials = []
  root = epath.Path(sweep_dir)
  paths = [root] if (root / 'metrics.jsonl').exists() else sorted(root.iterdir())
  for path in paths:
    if not (path / 'metrics.jsonl').exists():
      continue
    records = [json.loads(line) for line in (path / 'metrics.jsonl').read_text().splitlines()
               if line.strip()]
    config = json.loads((path / 'config.json').read_text())
    results = None
    if (path / 'results.json').exists():
      results = json.loads((path / 'results.json').read_text())
    trials.append({'name': path.name, 'records': records, 'config': config, 'results': results})
  return trials


def series(trial, tag):
  points = [(r['step'], r[tag]) for r in trial['records'] if tag in r]
  return np.array(points).T if points else np.zeros((2, 0))


def last(trial, tag):
  s = series(trial, tag)
  return float(s[1, -1]) if s.shape[1] else None


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _is_cifar_resnet(trial):
  """The paper's CIFAR nets (BatchNorm, ReLU): what Figure 6 and Table 6 compare."""
  m = trial['config']['model']
  return (m['name'] == 'resnet_cifar' and m.get('batch_norm', True)
          and m.get('activation') == 'relu')


def figure6(trials, path):
  """Plain nets left, ResNets right; dashed: training error, solid: test error."""
  trials = [t for t in trials if _is_cifar_resnet(t)]
  if not trials:
    return False
  plt = _plt()
  depths = sorted({t['config']['model']['depth'] for t in trials})
  colours = dict(zip(depths, plt.cm.viridis(np.linspace(0, 0.9, len(depths)))))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  top = 0
  for ax, residual in zip(axes, (False, True)):
    for t in sorted(trials, key=lambda t: t['config']['model']['depth']):
      m = t['config']['model']
      if m['residual'] != residual:
        continue
      label = f'{"ResNet" if residual else "plain"}-{m["depth"]}'
      for tag, style in (('train/error', '--'), ('test/error', '-')):
        x, y = series(t, tag)
        if len(x):
          ax.plot(x, 100 * y, style, color=colours[m['depth']],
                  label=label if tag == 'test/error' else None, linewidth=1.4)
          top = max(top, 100 * y.max())
    ax.set_title('ResNets' if residual else 'plain networks')
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(title='solid: test, dashed: train', fontsize=8, title_fontsize=8)
    else:  # E.g. the report of a single run.
      ax.text(0.5, 0.5, f'no {"ResNets" if residual else "plain nets"} among these runs',
              ha='center', va='center', transform=ax.transAxes, color='grey')
  axes[0].set_ylabel('error (%)')
  axes[0].set_ylim(0, min(100, top * 1.05) or 100)
  fig.suptitle('CIFAR-10: training (dashed) and test (solid) error')
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)
  return True


def _pct(x):
  return '-' if x is None else f'{100 * x:.2f}'


def table6(trials):
  rows = ['| method | depth | parameters | test error (%) | paper (%) | train error (%) | steps |',
          '|---|---:|---:|---:|---:|---:|---:|']
  for t in sorted([t for t in trials if _is_cifar_resnet(t)],
                  key=lambda t: (t['config']['model']['residual'], t['config']['model']['depth'])):
    m, res = t['config']['model'], t['results'] or {}
    paper = PAPER_TEST_ERROR.get(m['depth']) if m['residual'] else None
    params = f'{res["num_params"]:,}' if res else '-'
    steps = res['step'] if res else '(unfinished)'
    rows.append(f'| {"ResNet" if m["residual"] else "plain"} | {m["depth"]} | {params} | '
                f'{_pct(last(t, "test/error"))} | {"-" if paper is None else paper} | '
                f'{_pct(last(t, "train/error"))} | {steps} |')
  return '\n'.join(rows)


def leaderboard(trials):
  ranked = sorted(trials, key=lambda t: (last(t, 'test/error') is None,
                                         last(t, 'test/error') or 0))
  rows = ['| rank | trial | test error (%) | top-5 error (%) | train error (%) | steps | status |',
          '|---:|---|---:|---:|---:|---:|---|']
  for i, t in enumerate(ranked, 1):
    steps = max([r['step'] for r in t['records']], default=0)
    rows.append(f'| {i} | {t["name"]} | {_pct(last(t, "test/error"))} | '
                f'{_pct(last(t, "test/top5_error"))} | {_pct(last(t, "train/error"))} | '
                f'{steps} | {"finished" if t["results"] else "unfinished"} |')
  return '\n'.join(rows)


def first_grad_norms(trial):
  """Per-layer gradient norms at the first logged step, in forward order."""
  records = [r for r in trial['records'] if any(k.startswith('grad_norm/') for k in r)]
  if not records:
    return None
  first = records[0]
  order = (trial['results'] or {}).get('layer_order') or sorted(
      k[len('grad_norm/'):] for k in first if k.startswith('grad_norm/'))
  return np.array([first[f'grad_norm/{layer}'] for layer in order
                   if f'grad_norm/{layer}' in first])


def net_name(model):
  """'ResNet-20', 'plain-20' (the paper's names), with the activation when it is not ReLU."""
  if model['name'] == 'resnet_cifar':
    name = f'{"ResNet" if model.get("residual", True) else "plain"}-{model["depth"]}'
  else:
    name = f'{model["name"]}{model.get("depth", "")}'
  activation = model.get('activation', 'relu')
  return name if activation == 'relu' else f'{name}, {activation}'


def grad_norm_report(trials, path):
  with_norms = [(t, first_grad_norms(t)) for t in trials]
  with_norms = [(t, n) for t, n in with_norms if n is not None and len(n)]
  if not with_norms:
    return None
  plt = _plt()
  depths = sorted({t['config']['model']['depth'] for t, _ in with_norms})
  fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.8), squeeze=False)
  rows = ['| trial | net | activation | depth | first-layer grad norm | last-layer grad norm | '
          'first / last |', '|---|---|---|---:|---:|---:|---:|']
  for ax, depth in zip(axes[0], depths):
    for t, norms in with_norms:
      m = t['config']['model']
      if m['depth'] != depth:
        continue
      ax.semilogy(np.arange(1, len(norms) + 1), norms, marker='.', label=net_name(m))
      rows.append(f'| {t["name"]} | {net_name(m)} | {m["activation"]} | {depth} | '
                  f'{norms[0]:.3g} | {norms[-1]:.3g} | {norms[0] / norms[-1]:.3g} |')
    ax.set_title(f'depth {depth}: gradient norm per layer at step 0')
    ax.set_xlabel('layer index (1 = first conv)')
    ax.set_ylabel('gradient norm (log scale)')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  plt.close(fig)
  return '\n'.join(rows)


def write_report(sweep_dir):
  trials = load_trials(sweep_dir)
  if not trials:
    raise SystemExit(f'cvjax.tools.report: no runs in {sweep_dir}: expected a run (a workdir '
                     'with metrics.jsonl) or a sweep (subfolders with one each).')
  out = epath.Path(sweep_dir) / 'report'
  out.mkdir(parents=True, exist_ok=True)
  name = epath.Path(sweep_dir) if '://' in str(sweep_dir) else epath.Path(sweep_dir).resolve()
  page = [f'# Report: {name.name}', '']
  if figure6(trials, out / 'figure6.png'):
    table = table6(trials)
    (out / 'table6.md').write_text(table + '\n')
    page += ['![Figure 6](figure6.png)', '', '## Table 6', '', table, '']
  board = leaderboard(trials)
  (out / 'leaderboard.md').write_text(board + '\n')
  page += ['## Leaderboard', '', board, '']
  norms = grad_norm_report(trials, out / 'grad_norms.png')
  if norms:
    (out / 'grad_norms.md').write_text(norms + '\n')
    page += ['## Gradient norms', '', '![gradient norms](grad_norms.png)', '', norms, '']
  (out / 'README.md').write_text('\n'.join(page))
  return out


if __name__ == '__main__':
  if len(sys.argv) != 2:
    raise SystemExit('usage: python -m cvjax.tools.report SWEEP_DIR|RUN_DIR')
  print(f'wrote {write_report(sys.argv[1])}')
