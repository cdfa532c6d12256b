"""Which test examples a model gets wrong, and as what.

Turns predictions into figures and tables: at the end of a run, and for any saved
checkpoint through `python -m cvjax.evaluate`, writes into WORKDIR/error_analysis/:
confusion.png, mistakes.png (a grid of misclassified test images captioned "true ->
predicted", as the lecture shows LeNet's mistakes) and error_analysis.json (confusion
matrix, per-class error), and the two figures as TensorBoard images.
"""

import json

from etils import epath
import numpy as np


def confusion_matrix(labels, predictions, num_classes):
  """[true class, predicted class] counts."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels, predictions), 1)
  return cm


def per_class_error(cm):
  totals = cm.sum(axis=1)
  return np.where(totals > 0, 1 - np.diag(cm) / np.maximum(totals, 1), np.nan)


def _figure(rows, cols, tile):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(rows, cols, figsize=(cols * tile, rows * tile), squeeze=False)


def mistakes_image(images, labels, predictions, class_names, max_tiles=100):
  """The first `max_tiles` mistakes in test-set order as one grid of tiles captioned
  "true -> predicted"; returns (RGB uint8 array, captions). Drawn with PIL: a matplotlib axes
  per tile took seconds, longer than a quick training run."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  wrong = np.flatnonzero(labels != predictions)[:max_tiles]
  captions = [f'{class_names[labels[i]]} -> {class_names[predictions[i]]}' for i in wrong]
  h, w, c = images.shape[1:]
  scale = max(1, 96 // max(h, w))  # Tiles of ~96 pixels, nearest-neighbour: pixels stay sharp.
  th, tw = h * scale, w * scale
  cell_w, cell_h, band, top = max(tw, 120) + 8, th + 20, 16, 24
  cols = min(10, max(len(wrong), 1))
  rows = max(-(-len(wrong) // cols), 1)
  grid = Image.new('RGB', (cols * cell_w, top + rows * cell_h), 'white')
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default(size=11)
  draw.text((4, 4), f'{len(wrong)} of {int(np.sum(labels != predictions))} misclassified test '
            'images (true -> predicted)', fill='black', font=font)
  for k, (i, caption) in enumerate(zip(wrong, captions)):
    r, col = divmod(k, cols)
    tile = images[i].repeat(scale, 0).repeat(scale, 1)
    tile = 255 - tile[..., 0] if c == 1 else tile  # Digits dark on white, as on paper.
    x, y = col * cell_w + (cell_w - tw) // 2, top + r * cell_h
    grid.paste(Image.fromarray(tile), (x, y + band))
    draw.text((col * cell_w + cell_w // 2, y + band - 2), caption, fill='black', font=font,
              anchor='mb')
  return np.asarray(grid), captions


def render(fig, dpi=120):
  """The figure as an RGB uint8 array, and closes it."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.set_dpi(dpi)
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return pixels


def confusion_figure(cm, class_names):
  fig, axes = _figure(1, 1, max(4.0, 0.5 * len(class_names)))
  ax = axes[0, 0]
  ax.imshow(cm, cmap='Blues')
  ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
  ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if len(class_names) <= 20:
    for (t, p), count in np.ndenumerate(cm):
      ax.text(p, t, str(count), ha='center', va='center', fontsize=6,
              color='white' if count > cm.max() / 2 else 'black')
  ax.set_title(f'Confusion matrix ({cm.sum()} test images, '
               f'{100 * (1 - np.trace(cm) / cm.sum()):.2f}% error)', fontsize=9)
  fig.tight_layout()
  return fig


def write(workdir, images, labels, predictions, class_names, *, step, writer=None,
          max_tiles=100):
  """Writes the artefacts; returns the summary dict saved as error_analysis.json."""
  out = epath.Path(workdir) / 'error_analysis'
  out.mkdir(parents=True, exist_ok=True)
  cm = confusion_matrix(labels, predictions, len(class_names))
  mistakes, captions = mistakes_image(images, labels, predictions, class_names, max_tiles)
  confusion = render(confusion_figure(cm, class_names))  # Drawn once, for PNG and TensorBoard.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name, pixels in (('mistakes', mistakes), ('confusion', confusion)):
    with (out / f'{name}.png').open('wb') as f:
      Image.fromarray(pixels).save(f, format='png')
    if writer is not None:
      writer.add_image(f'error_analysis/{name}', pixels, step, dataformats='HWC')
  summary = {'step': int(step), 'num_test': int(cm.sum()),
             'num_mistakes': int(cm.sum() - np.trace(cm)), 'mistakes_shown': len(captions),
             'class_names': list(class_names), 'confusion_matrix': cm.tolist(),
             'per_class_error': {c: float(e) for c, e in zip(class_names, per_class_error(cm))}}
  (out / 'error_analysis.json').write_text(json.dumps(summary, indent=1))
  return summary
