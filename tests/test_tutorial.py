"""docs/tutorial.ipynb runs from top to bottom in a Jupyter kernel, in its small setting."""

import os
import re

import pytest

from conftest import ROOT

# The [notebook] extra; requirements.txt pins both, so CI runs this test.
nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

NOTEBOOK = os.path.join(ROOT, 'docs', 'tutorial.ipynb')


def test_tutorial_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'CVJAX_TUTORIAL_SMALL' in code[0].source and 'google.colab' in code[0].source


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
