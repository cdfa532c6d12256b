"""Which test examples a model gets wrong, and as what.

Turns predictions into figures and tables: at the end of a run, and for any saved
checkpoint through `python -m cvjax.evaluate`, writes into WORKDIR/error_analysis/:
confusion.png, mistakes.png (a grid of misclassified test images captioned "true ->
predicted", as the lecture shows LeNet's mistakes: each class in turn, the most confident
first), per_class_error.png (a bar per class) and error_analysis.json (confusion matrix,
per-class error), and the three figures as TensorBoard images.
"""

import json
import os

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
  """A figure drawn by Agg, outside pyplot: the caller's matplotlib backend stays as it was
  (a notebook keeps showing its own plots)."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(cols * tile, rows * tile))
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.subplots(rows, cols, squeeze=False)


def _font(size):
  """DejaVu Sans from matplotlib's own files: PIL's built-in font runs words together."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  path = os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf')
  return ImageFont.truetype(path, size) if os.path.exists(path) else \
      ImageFont.load_default(size=size)


def pick_mistakes(labels, predictions, confidence=None, max_tiles=100):
  """Indices of the mistakes to show: taken in turn from each true class (an image folder is
  read class by class, so the first mistakes in test order are all one class), each class's
  most confident mistakes first (those teach most: the net was sure and wrong)."""
  wrong = np.flatnonzero(labels != predictions)
  rank = -np.asarray(confidence)[wrong] if confidence is not None else np.arange(len(wrong))
  per_class = [wrong[labels[wrong] == c][np.argsort(rank[labels[wrong] == c], kind='stable')]
               for c in np.unique(labels[wrong])]
  turns = [(k, i) for members in per_class for k, i in enumerate(members)]
  return np.array([i for _, i in sorted(turns, key=lambda t: t[0])][:max_tiles], np.int64)


def mistakes_image(images, labels, predictions, class_names, max_tiles=100, confidence=None):
  """A grid of misclassified test images (`pick_mistakes`), each captioned "true -> predicted"
  and, given the model's `confidence` (its probability for the predicted class), that
  probability; returns (RGB uint8 array, captions). Images are drawn as the data hold them
  (a grey digit stays white on black). Drawn with PIL: a matplotlib axes per tile took
  seconds, longer than a quick training run."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  shown = pick_mistakes(labels, predictions, confidence, max_tiles)
  captions = [f'{class_names[labels[i]]} -> {class_names[predictions[i]]}'
              + (f' {100 * confidence[i]:.0f}%' if confidence is not None else '')
              for i in shown]
  h, w, c = images.shape[1:]
  scale = max(1, 96 // max(h, w))  # Tiles of ~96 pixels, nearest-neighbour: pixels stay sharp.
  th, tw = h * scale, w * scale
  font, title_font = _font(11), _font(13)
  widest = max([int(font.getlength(t)) for t in captions] + [tw])
  cell_w, band, top = widest + 12, 18, 44
  cell_h = th + band + 6
  cols = min(10, max(len(shown), 1))
  rows = max(-(-len(shown) // cols), 1)
  grid = Image.new('RGB', (max(cols * cell_w, 640), top + rows * cell_h), 'white')
  draw = ImageDraw.Draw(grid)
  num_wrong = int(np.sum(labels != predictions))
  order = ('most confident first' if confidence is not None else 'in test order')
  draw.text((6, 4), f'{len(shown)} of {num_wrong:,} misclassified test images '
            f'(of {len(labels):,}): each true class in turn, {order}', fill='black',
            font=title_font)
  draw.text((6, 24), 'caption: true class -> predicted class'
            + (' and the probability the model gave it' if confidence is not None else ''),
            fill='#444444', font=font)
  for k, (i, caption) in enumerate(zip(shown, captions)):
    r, col = divmod(k, cols)
    tile = images[i].repeat(scale, 0).repeat(scale, 1)
    tile = Image.fromarray(tile[..., 0], 'L') if c == 1 else Image.fromarray(tile)
    x, y = col * cell_w + (cell_w - tw) // 2, top + r * cell_h
    grid.paste(tile.convert('RGB'), (x, y + band))
    draw.text((col * cell_w + cell_w // 2, y + band - 3), caption, fill='black', font=font,
              anchor='mb')
  return np.asarray(grid), captions


def per_class_figure(errors, counts, class_names):
  """Test error of each true class as horizontal bars, worst on top, the overall error as a
  line: which classes the model finds hard."""
  n = len(class_names)
  fig, axes = _figure(1, 1, 1)
  ax = axes[0, 0]
  fig.set_size_inches(6.4, max(2.5, 0.28 * min(n, 100) + 1.2))
  order = np.argsort(np.nan_to_num(errors, nan=-1))  # Worst last: at the top of the chart.
  order = order[-100:]  # CIFAR-100 and smaller: every class; ImageNet: the worst 100.
  values = 100 * np.nan_to_num(errors[order])
  ax.barh(range(len(order)), values, color='#d62728')
  ax.set_yticks(range(len(order)), [class_names[i] for i in order], fontsize=7 if n > 20 else 9)
  for y, (v, i) in enumerate(zip(values, order)):
    ax.text(v, y, f' {v:.1f}% of {counts[i]}', va='center', fontsize=7)
  overall = 100 * np.nansum(errors * counts) / max(np.sum(counts), 1)
  ax.axvline(overall, color='grey', linestyle='--', linewidth=1, zorder=0,
             label=f'all classes: {overall:.2f}%')
  ax.set_xlim(0, max(values.max() * 1.3, overall * 1.3, 1))
  ax.set_xlabel('test error of the class (%): share of its images predicted as another class')
  ax.legend(loc='lower right', fontsize=8)
  shown = '' if len(order) == n else f', the worst {len(order)} of {n}'
  ax.set_title(f'Test error per true class{shown}', fontsize=10)
  fig.tight_layout()
  return fig


def render(fig, dpi=120):
  """The figure as an RGB uint8 array."""
  fig.set_dpi(dpi)
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(cm, class_names):
  """The confusion matrix coloured by the mistakes: each cell's share of its true class's
  images, the diagonal (the correct ones, most of the counts) left out of the colours and
  drawn grey, and the colour scale (square root) running up to the largest mistake, so small
  confusions show. Each cell is captioned with its count."""
  import numpy.ma as ma  # pylint: disable=g-import-not-at-top
  fig, axes = _figure(1, 1, max(4.0, 0.5 * len(class_names)))
  ax = axes[0, 0]
  shares = 100 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  mistakes = ma.masked_array(shares, mask=np.eye(len(cm), dtype=bool))
  top = max(float(mistakes.max() or 0), 1e-9)  # masked max of an all-masked or all-0: 0.
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps['Reds'].with_extremes(bad='#d9d9d9')  # Bad: the diagonal.
  # A square-root scale: one mistake in 100 still shows beside a confusion of 20 in 100.
  image = ax.imshow(mistakes, cmap=cmap, norm=matplotlib.colors.PowerNorm(0.5, 0, top))
  bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  bar.set_label("% of the true class's images predicted as this class", fontsize=7)
  bar.ax.tick_params(labelsize=7)
  ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
  ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if len(class_names) <= 20:
    for (t, p), count in np.ndenumerate(cm):
      ax.text(p, t, str(count), ha='center', va='center', fontsize=6,
              color='white' if t != p and shares[t, p] > top / 3 else 'black')
  ax.set_title(f'Confusion matrix ({cm.sum()} test images, '
               f'{100 * (1 - np.trace(cm) / max(cm.sum(), 1)):.2f}% error)\ncounts; colour: the '
               'mistakes (grey diagonal: correct)', fontsize=9)
  fig.tight_layout()
  return fig


def write(workdir, images, labels, predictions, class_names, *, step, writer=None,
          max_tiles=100, confidence=None):
  """Writes the artefacts; returns the summary dict saved as error_analysis.json.
  `confidence`: the model's probability for each predicted class, to show the most
  confident mistakes first."""
  out = epath.Path(workdir) / 'error_analysis'
  out.mkdir(parents=True, exist_ok=True)
  cm = confusion_matrix(labels, predictions, len(class_names))
  errors = per_class_error(cm)
  mistakes, captions = mistakes_image(images, labels, predictions, class_names, max_tiles,
                                      confidence)
  # Drawn once, for PNG and TensorBoard.
  confusion = render(confusion_figure(cm, class_names))
  per_class = render(per_class_figure(errors, cm.sum(axis=1), class_names))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name, pixels in (('mistakes', mistakes), ('confusion', confusion),
                       ('per_class_error', per_class)):
    with (out / f'{name}.png').open('wb') as f:
      Image.fromarray(pixels).save(f, format='png')
    if writer is not None:
      writer.add_image(f'error_analysis/{name}', pixels, step, dataformats='HWC')
  summary = {'step': int(step), 'num_test': int(cm.sum()),
             'num_mistakes': int(cm.sum() - np.trace(cm)), 'mistakes_shown': len(captions),
             'class_names': list(class_names), 'confusion_matrix': cm.tolist(),
             'per_class_error': {c: float(e) for c, e in zip(class_names, errors)}}
  (out / 'error_analysis.json').write_text(json.dumps(summary, indent=1))
  return summary
