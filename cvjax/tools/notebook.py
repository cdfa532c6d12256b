"""Executes docs/tutorial.ipynb and writes docs/tutorial_executed.ipynb: the copy with its
outputs (progress lines, tables, figures) that a reader sees without running anything.

  python -m cvjax.tools.notebook            # the full setting (~6 min on a 2-core CPU)
  python -m cvjax.tools.notebook --small    # CVJAX_TUTORIAL_SMALL=1: a check, ~2-3 min

Run it from a checkout after `pip install -e '.[notebook]'`, and again after every change to
the tutorial: tests/test_tutorial.py fails while the copy's code differs from the tutorial's.
The runs go to docs/tutorial_runs/ (ignored by git); a finished run there is read back, not
trained again, so delete that folder for fresh outputs. A first cell added to the copy says
which setting, machine and date produced its outputs.
"""

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, 'docs', 'tutorial.ipynb')
EXECUTED = os.path.join(ROOT, 'docs', 'tutorial_executed.ipynb')
COMMAND = 'python -m cvjax.tools.notebook'


def _cpu():
  """The processor's name, for the copy's first cell (timings depend on it)."""
  from cvjax.tools import cpu_peak  # pylint: disable=g-import-not-at-top
  cpu = cpu_peak.this_cpu()
  if cpu is None:
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
  return f'{cpu.name or cpu.vendor} ({cpu_peak.kind(cpu)}), {cpu.cores} cores'


def header(small, minutes, when):
  """The markdown cell put first in the executed copy."""
  setting = ('the **small setting** (`CVJAX_TUTORIAL_SMALL=1`: every run a few steps, so its '
             'numbers are near chance and its figures show a check that every cell runs, not '
             'the results the text discusses)') if small else (
             'the **full setting** (the runs and numbers the text discusses)')
  return (f'*This is `docs/tutorial.ipynb` with its outputs, produced by `{COMMAND}'
          f'{" --small" if small else ""}` in {setting}, on {when} in {minutes:.1f} min on '
          f'{_cpu()}. Edit `tutorial.ipynb`, not this copy, then run the command again.*')


def _without_local_paths(nb, folder):
  """The outputs name files relative to the notebook's folder (as a reader's own run would),
  not by this machine's absolute paths (the checkout, the home folder, site-packages)."""
  import site  # pylint: disable=import-outside-toplevel
  swaps = [(os.path.join(folder, ''), ''), (os.path.join(ROOT, ''), '../')]
  swaps += [(os.path.join(d, ''), '<site-packages>/') for d in site.getsitepackages()]
  swaps += [(os.path.join(os.path.expanduser('~'), ''), '~/')]

  def clean(text):
    for old, new in swaps:
      text = text.replace(old, new)
    return text.replace(folder, '.')

  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if 'text' in out:
        out.text = clean(out.text)
      for kind, value in out.get('data', {}).items():
        if kind.startswith('text/'):
          out.data[kind] = clean(value)


def execute(small=False, source=SOURCE, output=EXECUTED):
  """Runs every cell of `source` in a fresh python3 kernel in its folder and writes `output`."""
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel

  nb = nbformat.read(source, as_version=4)
  env = dict(os.environ)
  env.pop('CVJAX_TUTORIAL_SMALL', None)
  if small:
    env['CVJAX_TUTORIAL_SMALL'] = '1'
  # The kernel finds cvjax and configs in this checkout, as after `pip install -e .`.
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
  start = time.time()
  client = nbclient.NotebookClient(
      nb, timeout=1800, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(source)}})
  client.execute(env=env)
  minutes = (time.time() - start) / 60
  _without_local_paths(nb, os.path.dirname(os.path.abspath(source)))
  when = time.strftime('%Y-%m-%d', time.gmtime())
  nb.cells.insert(0, nbformat.v4.new_markdown_cell(header(small, minutes, when)))
  nb.metadata.pop('widgets', None)
  nbformat.write(nb, output)
  return minutes


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog=COMMAND, description='Writes docs/tutorial_executed.ipynb, the tutorial with its outputs.',
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--small', action='store_true',
                      help='the small setting (CVJAX_TUTORIAL_SMALL=1): tiny runs, a check')
  parser.add_argument('--output', default=EXECUTED, help='where to write the executed copy')
  args = parser.parse_args(argv)
  if not os.path.exists(SOURCE):
    print(f'{COMMAND}: error: {SOURCE} not found; run this from a checkout of cvjax (the '
          'tutorial is not part of the installed package).', file=sys.stderr)
    return 2
  try:
    import nbclient  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print(f"{COMMAND}: error: nbclient is not installed; it comes with the notebook extra: "
          "pip install -e '.[notebook]'", file=sys.stderr)
    return 2
  minutes = execute(args.small, SOURCE, args.output)
  print(f'wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB, executed in '
        f'{minutes:.1f} min)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
