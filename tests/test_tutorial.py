"""docs/tutorial.ipynb runs from top to bottom in a Jupyter kernel, in its small setting, and
docs/tutorial_executed.ipynb (the copy with outputs) holds the same cells."""

import json
import os
import re

import pytest

from conftest import ROOT

# The [notebook] extra; requirements.txt pins both, so CI runs this test.
nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

NOTEBOOK = os.path.join(ROOT, 'docs', 'tutorial.ipynb')
EXECUTED = os.path.join(ROOT, 'docs', 'tutorial_executed.ipynb')


def test_tutorial_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'CVJAX_TUTORIAL_SMALL' in code[0].source and 'google.colab' in code[0].source


def test_executed_copy_has_the_tutorials_cells_and_their_outputs():
  """The copy a reader sees is the tutorial as it is now, run: after an edit to the tutorial,
  this fails until `python -m cvjax.tools.notebook` writes the copy again (no re-execution
  here: that is the slow test below)."""
  source = nbformat.read(NOTEBOOK, as_version=4)
  copy = nbformat.read(EXECUTED, as_version=4)
  nbformat.validate(copy)
  header, cells = copy.cells[0], copy.cells[1:]
  assert header.cell_type == 'markdown' and 'python -m cvjax.tools.notebook' in header.source
  assert re.search(r'the \*\*(small|full) setting\*\*', header.source), header.source
  assert ('--small' in header.source) == ('small setting**' in header.source)
  stale = [i for i, (a, b) in enumerate(zip(source.cells, cells), 1)
           if (a.cell_type, a.source) != (b.cell_type, b.source)]
  assert len(source.cells) == len(cells) and not stale, (
      f'docs/tutorial_executed.ipynb differs from docs/tutorial.ipynb (cells {stale}): run '
      '`python -m cvjax.tools.notebook` to write it again')
  code = [c for c in cells if c.cell_type == 'code']
  # Every cell ran, in order, in one kernel; none ended in an error.
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 6
  # No path of the machine that ran it: files are named from the notebook's folder.
  text = json.dumps([o for o in outputs if 'image/png' not in o.get('data', {})])
  assert os.path.join(ROOT, '') not in text and os.path.expanduser('~/') not in text
  # Kept small enough to store and to show on a repository's web page.
  assert os.path.getsize(EXECUTED) < 2_000_000


@pytest.mark.slow
def test_tutorial_runs_in_its_small_setting(tmp_path, monkeypatch):
  """Every cell runs (a failing cell fails the test, naming it) in a fresh folder, and every
  figure it draws or reads back reaches the notebook."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  monkeypatch.setenv('CVJAX_TUTORIAL_SMALL', '1')
  # The kernel finds cvjax and configs in the checkout, as after `pip install -e .`.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  # The LeNet curves, its mistakes and confusion matrix, Figure 6, the gradient norms and the
  # top-5 examples.
  assert len(figures) == 6, [o.get('data', {}).keys() for o in outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  scored = [l for l in text.splitlines() if l.startswith(('checkpoint: top-1', 'from the files'))]
  # The checkpoint's top-1 and top-5 error, and the same from its predictions file.
  assert len(scored) == 2 and re.findall(r'[\d.]+%', scored[0]) == re.findall(r'[\d.]+%', scored[1])
  # Where the small setting's numbers appear, it says what they are (near chance, a check).
  noted = [l for l in text.splitlines() if 'small setting: a few steps' in l]
  assert len(noted) >= 4 and any('plain8: test error' in l for l in noted), text[-2000:]
  assert 'step 8/8' in text  # The progress lines reach the cell while it trains.
  runs = tmp_path / 'tutorial_runs'
  for run in ('lenet', 'depth/plain8', 'depth/resnet8', 'activations/sigmoid8',
              'activations/tanh8', 'activations/relu8'):
    assert (runs / run / 'results.json').exists(), run


def test_notebook_command_executes_in_the_setting_asked_and_says_so(tmp_path, monkeypatch):
  """`python -m cvjax.tools.notebook --small` runs the kernel with CVJAX_TUTORIAL_SMALL=1 (and
  the full setting without it, whatever the caller's environment) and heads the copy with it."""
  from cvjax.tools import notebook  # pylint: disable=import-outside-toplevel
  source, output = tmp_path / 'nb.ipynb', tmp_path / 'out.ipynb'
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import os, cvjax\nprint(os.environ.get('CVJAX_TUTORIAL_SMALL'), os.getcwd(), cvjax.__file__)")])
  nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
  nbformat.write(nb, str(source))
  monkeypatch.setenv('CVJAX_TUTORIAL_SMALL', '1')
  notebook.execute(small=False, source=str(source), output=str(output))
  copy = nbformat.read(str(output), as_version=4)
  assert copy.cells[0].cell_type == 'markdown' and 'full setting' in copy.cells[0].source
  # The kernel runs in the notebook's folder with this checkout's cvjax; the copy names both
  # without this machine's paths (the checkout's root as from docs/).
  assert copy.cells[1].outputs[0].text.split() == ['None', '.', '../cvjax/__init__.py']
  notebook.execute(small=True, source=str(source), output=str(output))
  copy = nbformat.read(str(output), as_version=4)
  assert 'small setting' in copy.cells[0].source and '--small' in copy.cells[0].source
  assert copy.cells[1].outputs[0].text.split()[0] == '1'
